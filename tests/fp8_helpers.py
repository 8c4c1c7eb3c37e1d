"""FP8 checkpoints in tests: the same model dequantised, and the FP8 ops swapped for their plain references.

`write_dequantized(fp8_dir, out_dir)` copies an FP8 checkpoint with every FP8 weight replaced by
q * scale in float32 and the scales and quantization_config dropped: the unquantised path of our
model then runs on exactly the weights the FP8 path holds. `plain_fp8_references()` makes the FP8
linear and MoE dequantise and leave activations unquantised, which is that unquantised path.
"""

import contextlib
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tests.helpers import read_checkpoint
from worker import kernels
from worker.kernels.fp8.quant import FP8_DTYPE, dequantize_block_fp8
from worker.kernels.fp8.reference import dequant_block_fp8_linear
from worker.kernels.linear import linear as dense_linear
from worker.kernels.moe.fp8_reference import fused_moe_fp8_dequant


def write_dequantized(fp8_dir: Path, out_dir: Path) -> Path:
    fp8_dir, out_dir = Path(fp8_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    config = json.loads((fp8_dir / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"][0]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in fp8_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(extra, out_dir / extra.name)
    stored = read_checkpoint(fp8_dir)
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == FP8_DTYPE:
            tensor = dequantize_block_fp8(tensor, stored[f"{name}_scale_inv"], block)
        tensors[name] = tensor.float()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def dequant_block_fp8_linear_with_dense(x, weight, weight_scale_inv, block, dense_weight):
    return dequant_block_fp8_linear(x, weight, weight_scale_inv, block), dense_linear(x, dense_weight)


@contextlib.contextmanager
def plain_fp8_references():
    """The FP8 ops as the unquantised model on the dequantised weights (no activation quantisation)."""
    names = ("fp8_block_linear", "fp8_block_linear_with_dense", "fused_moe_fp8")
    saved = [getattr(kernels, name) for name in names]
    for name, plain in zip(names, (dequant_block_fp8_linear, dequant_block_fp8_linear_with_dense,
                                   fused_moe_fp8_dequant)):
        setattr(kernels, name, plain)
    try:
        yield
    finally:
        for name, op in zip(names, saved):
            setattr(kernels, name, op)
