"""Build the model and fill it from an HF checkpoint folder, tensor by tensor.

Accepts `model.safetensors` or a sharded `model.safetensors.index.json`. Each checkpoint tensor is
cast to its parameter's dtype (the requested one, or float8_e4m3fn and float32 for the weights and
block scales of an FP8 checkpoint) and handed to the parameter's `weight_loader`, which copies this
rank's slice. Per-expert keys (weights and scales) are stacked into the experts' w13 / w2 tensors.
An FP8 tensor for a parameter that is not FP8, or the reverse, is an error: casting either way
would load wrong values silently.
"""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from worker.config import ConfigError, ModelConfig
from worker.kernels.fp8.quant import FP8_DTYPE
from worker.model.layers.checkpoint_tensor import CheckpointTensor
from worker.model.layers.fp8 import dtype_name, is_block_scale
from worker.model.layers.linear import default_weight_loader
from worker.model.dummy_weights import init_dummy_weights
from worker.model.moe import SHARED
from worker.model.qwen3_next import Qwen3NextForCausalLM

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                         r"\.(?P<kind>weight|weight_scale_inv)$")
# A shared expert as wide as the routed ones is stored as their last expert, its gate as the router's last row.
_SHARED_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp)\.shared_expert\.(?P<proj>gate_proj|up_proj|down_proj)"
                                r"\.(?P<kind>weight|weight_scale_inv)$")
_SHARED_GATE_KEY = re.compile(r"^(?P<prefix>.*\.mlp)\.shared_expert_gate\.weight$")
_IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        files = {name: model_dir / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from e


def _target(name: str, params: dict) -> tuple[str, object]:
    """Checkpoint name -> (parameter name, shard_id)."""
    match = _EXPERT_KEY.match(name)
    if match:
        return f"{match['prefix']}.{_stacked_name(match)}", (int(match["expert"]), match["proj"])
    if name not in params:
        match = _SHARED_EXPERT_KEY.match(name)
        if match:
            return f"{match['prefix']}.experts.{_stacked_name(match)}", (SHARED, match["proj"])
        match = _SHARED_GATE_KEY.match(name)
        if match:
            return f"{match['prefix']}.gate.weight", SHARED
    return name, None


def _stacked_name(match: re.Match) -> str:
    suffix = "_scale_inv" if match["kind"] == "weight_scale_inv" else ""
    return ("w2" if match["proj"] == "down_proj" else "w13") + suffix


def _checkpoint_name(param: str, shard) -> str:
    """The checkpoint tensor that fills (param, shard): the inverse of `_target`."""
    if shard is None:
        return param
    if shard == SHARED:
        return param.removesuffix(".gate.weight") + ".shared_expert_gate.weight"
    expert, proj = shard
    prefix, stacked = param.rsplit(".", 1)
    kind = "weight_scale_inv" if stacked.endswith("_scale_inv") else "weight"
    if expert == SHARED:
        return f"{prefix.removesuffix('.experts')}.shared_expert.{proj}.{kind}"
    return f"{prefix}.{expert}.{proj}.{kind}"


def _expected_shards(model: torch.nn.Module) -> set[tuple[str, object]]:
    """(parameter, shard_id) pairs the checkpoint must fill; a parameter filled from several tensors
    lists their shard ids in `expected_shards`."""
    return {(name, shard) for name, param in model.named_parameters()
            for shard in getattr(param, "expected_shards", [None])}


def _build(config: ModelConfig, num_mtp: int, dtype: torch.dtype, device) -> Qwen3NextForCausalLM:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen3NextForCausalLM(config, num_mtp_layers=num_mtp)
    except ValueError as e:  # a layer that cannot hold its shard or its checkpoint's quantisation
        raise ConfigError(str(e)) from e
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    progress: bool = False,
    load_format: str = "auto",
) -> Qwen3NextForCausalLM:
    """load_format "auto": the folder's safetensors; "dummy": random weights from config.json alone
    (with an MTP layer, as the released Qwen3-Next checkpoints have), for benchmarks."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    model_dir = Path(model_dir)
    config = config or ModelConfig.from_pretrained(model_dir)
    if config.quantization is not None:
        b = config.quantization.block
        logger.info("%s: FP8 checkpoint: linear weights in float8_e4m3fn with %dx%d block scales, activations "
                    "quantised per token and %d features; modules_to_not_convert and the rest in %s",
                    model_dir, b, b, b, str(dtype).removeprefix("torch."))
    if load_format == "dummy":
        model = _build(config, config.num_mtp_layers or 1, dtype, device)
        init_dummy_weights(model)
        return _after_loading(model).eval()
    files = checkpoint_files(model_dir)
    num_mtp = 0
    if any(name.startswith("mtp.") for name in files):
        num_mtp = config.num_mtp_layers or 1
    model = _build(config, num_mtp, dtype, device)
    if config.tie_word_embeddings:
        files.pop("lm_head.weight", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_shards(model)
    if config.tie_word_embeddings:
        expected.discard(("lm_head.weight", None))
    loaded: set[tuple[str, object]] = set()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    bar = tqdm(total=len(files), desc="loading weights", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        with _open(file) as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the file")
                _load_tensor(params, name, f, loaded)
                bar.update()
    bar.close()
    missing = sorted(_describe_missing(name, shard) for name, shard in expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{model_dir}: missing weights: {shown}")
    return _after_loading(model).eval()


def _after_loading(model: torch.nn.Module) -> torch.nn.Module:
    """Layers that hold their weights in another layout than the checkpoint's convert them once here."""
    for module in model.modules():
        if hasattr(module, "after_loading"):
            module.after_loading()
    return model


def _describe_missing(name: str, shard) -> str:
    """The checkpoint tensor's name, and the stacked parameter it fills where that differs."""
    stored = _checkpoint_name(name, shard)
    return stored if stored == name else f"{stored} (into {name})"


def _load_tensor(params, name, handle, loaded) -> None:
    target, shard_id = _target(name, params)
    param = params.get(target)
    if param is None:
        if name.endswith(".weight_scale_inv"):
            raise CheckpointError(f"tensor {name!r}: an FP8 block scale, but {name.removesuffix('.weight_scale_inv')} "
                                  f"is not held in FP8 (the quantization_config exempts it, or it has no "
                                  f"quantization_config)")
        if not _IGNORED_KEYS.search(name):
            logger.warning("checkpoint tensor %s has no place in the model; ignored", name)
        return
    try:
        tensor = CheckpointTensor.from_safetensors(handle, name, param.dtype)
        _check_stored_dtype(name, tensor, param)
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        weight_loader(param, tensor, shard_id)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"tensor {name!r}: {e}") from e
    except Exception as e:  # safetensors' own errors for data it cannot read
        raise CheckpointError(f"tensor {name!r}: unreadable ({e})") from e
    loaded.add((target, shard_id))


def _check_stored_dtype(name: str, tensor: CheckpointTensor, param: torch.Tensor) -> None:
    stored = tensor.stored_dtype
    stored_fp8 = stored.is_floating_point and stored.itemsize == 1
    if param.dtype == FP8_DTYPE:
        if stored == FP8_DTYPE:
            return
        why = "the quantization_config stores this weight in FP8 e4m3 (its module is not in modules_to_not_convert)"
    elif is_block_scale(param):
        if stored.is_floating_point and not stored_fp8:
            return
        why = "a block scale must be float32 (or another float type wider than 8 bits)"
    else:
        if not stored_fp8:
            return
        why = "the model holds it unquantised (modules_to_not_convert exempts its module, or it is not a linear weight)"
    raise CheckpointError(f"tensor {name!r} is stored as {dtype_name(stored)}, but {why}; the checkpoint and "
                          f"its config.json disagree")
