"""FP8 weights as the layers hold them: float8_e4m3fn values plus one float32 scale per b x b block
(`weight_scale_inv`), sharded across tensor-parallel ranks in whole blocks.

A scale parameter carries `weight_block = b`; `narrow` then turns a weight's rows or columns into the
rows or columns of blocks that hold them, so one loader serves a weight and its scales. A shard that
would cut a block in two cannot be expressed by its scales: the layers refuse it when built
(`check_whole_blocks`), naming themselves and the tensor parallel size (SGLang issue 10852: the
Qwen3-Next shared expert, 512 wide, at tp 8).
"""

import torch
from torch import nn

from worker.config import Fp8Config
from worker.kernels.fp8.quant import FP8_DTYPE, cdiv, scale_shape
from worker.model.layers.checkpoint_tensor import CheckpointTensor


def fp8_block(quant_config: Fp8Config | None, prefix: str) -> int | None:
    """The block side when the checkpoint stores `prefix`'s weight in FP8, else None."""
    if quant_config is None or not quant_config.is_quantized(prefix):
        return None
    return quant_config.block


def uniform_fp8_block(quant_config: Fp8Config | None, prefixes: list[str], what: str) -> int | None:
    """The FP8 block of modules held as one stacked tensor (experts): all quantised, or none."""
    blocks = {fp8_block(quant_config, prefix) for prefix in prefixes}
    if len(blocks) > 1:
        raise ValueError(f"{what}: modules_to_not_convert exempts some of these weights from FP8 but not others; "
                         f"they are stacked into one tensor, so they must be all FP8 or none")
    return blocks.pop()


def require_unquantized(quant_config: Fp8Config | None, prefix: str, what: str) -> None:
    """Refuse an FP8 checkpoint that quantises a module held only in the activation dtype."""
    if fp8_block(quant_config, prefix) is not None:
        raise ValueError(f"{prefix}: the quantization_config stores it in FP8 (it is not in modules_to_not_convert), "
                         f"but {what} is only supported in the activation dtype, as the published FP8 checkpoints "
                         f"keep it")


def fp8_parameters(shape: tuple[int, ...], block: int) -> tuple[nn.Parameter, nn.Parameter]:
    """-> (weight [..., N, K] float8_e4m3fn, weight_scale_inv [..., ceil(N/b), ceil(K/b)] float32)."""
    weight = nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE), requires_grad=False)
    scale = nn.Parameter(torch.empty(scale_shape(shape, block), dtype=torch.float32), requires_grad=False)
    scale.weight_block = block
    return weight, scale


def is_block_scale(param: torch.Tensor) -> bool:
    return getattr(param, "weight_block", None) is not None


def checkpoint_shape(param: torch.Tensor, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What the checkpoint holds for `param` when its weight has `weight_shape`."""
    return scale_shape(weight_shape, param.weight_block) if is_block_scale(param) else tuple(weight_shape)


def narrow(param: torch.Tensor, loaded: CheckpointTensor, dim: int, start: int, length: int) -> torch.Tensor:
    """Weight rows (or columns) [start, start + length) of a checkpoint tensor; for a block scale, the
    blocks holding them (start a multiple of the block: `check_whole_blocks`)."""
    if is_block_scale(param):
        block = param.weight_block
        return loaded.narrow(dim, start // block, cdiv(length, block))
    return loaded.narrow(dim, start, length)


def check_whole_blocks(prefix: str, what: str, per_rank: int, total: int, num_shards: int, block: int | None,
                       tp_size: int) -> None:
    """Refuse a shard of `per_rank` of `total` rows (or columns) that does not hold whole FP8 blocks."""
    if block is None or num_shards == 1 or per_rank % block == 0:
        return
    raise ValueError(
        f"{prefix}: tensor parallel size {tp_size} leaves each rank {per_rank} of its {total} {what}, which would "
        f"split the checkpoint's {block}x{block} FP8 weight blocks (their scales cannot be divided); use a tensor "
        f"parallel size that leaves each rank a multiple of {block}")


def whole_block_order(order: torch.Tensor, block: int) -> torch.Tensor | None:
    """A row order as whole blocks: order's runs of `block` rows start at multiples of it and stay
    consecutive -> the blocks' order; else None."""
    if order.numel() % block:
        return None
    runs = order.view(-1, block)
    starts = runs[:, 0]
    if bool((starts % block).any()) or not torch.equal(runs, starts[:, None] + torch.arange(block, device=order.device)):
        return None
    return starts // block


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
