"""The e4m3 number format of FP8 checkpoints: weights quantised by square blocks, activations by
groups of features within a token.

A weight [N, K] is stored as float8_e4m3fn values q and a float32 `weight_scale_inv` s of shape
[ceil(N/b), ceil(K/b)], one per b x b block (the last blocks of a row or column may be partial):
weight[n, k] ~ q[n, k] * s[n // b, k // b]. Activations [T, K] are quantised the same way at run
time, one scale per token and group of b consecutive features, as the FP8 GEMM kernels read them.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448; e4m3fn has no infinity, so larger values must be clamped
# Smallest absolute maximum a block or group is scaled from: an all-zero one gets a finite scale.
MIN_AMAX = 1e-12


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_block(block: int) -> bool:
    """Whether the Triton FP8 kernels take blocks of this side: their K tile is one block, so a power of two
    of at least 16."""
    return block >= 16 and not block & (block - 1)


def quantisable(width: int, block: int | None) -> bool:
    """Whether a kernel that holds whole rows of `width` features (a power of two: its tile) can also write
    their e4m3 groups of `block` (a power of two, at most a row): the quantising norms and their kin."""
    return (block is not None and width > 0 and not width & (width - 1) and 0 < block <= width
            and not block & (block - 1))


def scale_shape(weight_shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """[..., N, K] -> [..., ceil(N/b), ceil(K/b)]: the shape of a weight's `weight_scale_inv`."""
    *lead, n, k = weight_shape
    return (*lead, cdiv(n, block), cdiv(k, block))


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """[..., ceil(N/b), ceil(K/b)] -> [..., N, K]: each block's scale at every element of the block."""
    return scale.repeat_interleave(block, dim=-2)[..., :rows, :].repeat_interleave(block, dim=-1)[..., :cols]


def dequantize_block_fp8(
    weight: torch.Tensor,  # [..., N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [..., ceil(N/b), ceil(K/b)] float32
    block: int,
) -> torch.Tensor:  # [..., N, K] float32
    """q * s in float32, block by block."""
    rows, cols = weight.shape[-2:]
    return weight.float() * expand_block_scales(weight_scale_inv.float(), rows, cols, block)


def quantize_block_fp8(
    weight: torch.Tensor,  # [..., N, K] floating point
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [..., N, K] float8_e4m3fn, weight_scale_inv [..., ceil(N/b), ceil(K/b)])
    """Each b x b block scaled so that its largest magnitude becomes 448, then rounded to e4m3
    (round to nearest even). Every step is exact or correctly rounded IEEE arithmetic, so the bytes
    do not depend on the CPU."""
    w = weight.float()
    *lead, rows, cols = w.shape
    padded = w.new_zeros(*lead, cdiv(rows, block) * block, cdiv(cols, block) * block)
    padded[..., :rows, :cols] = w
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., nb, b, kb, b]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    q = (w / expand_block_scales(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def per_token_group_quant_fp8(
    x: torch.Tensor,  # [T, K]
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_q [T, K] float8_e4m3fn, x_scale [T, ceil(K/g)] float32)
    """Dynamic activation quantisation: each token's features in groups of `group_size` (the last one
    may be shorter), each group scaled so that its largest magnitude becomes 448. Row t depends on
    row t alone, so a token quantises the same whatever batch it runs in."""
    tokens, features = x.shape
    num_groups = cdiv(features, group_size)
    groups = F.pad(x.float(), (0, num_groups * group_size - features)).view(tokens, num_groups, group_size)
    scale = groups.abs().amax(dim=-1).clamp(min=MIN_AMAX) / FP8_MAX
    x_q = (x.float() / scale.repeat_interleave(group_size, dim=-1)[:, :features]).clamp(-FP8_MAX, FP8_MAX)
    return x_q.to(FP8_DTYPE), scale


def dequantize_token_groups(
    x_q: torch.Tensor,  # [T, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [T, ceil(K/g)] float32
    group_size: int,
) -> torch.Tensor:  # [T, K] float32
    return x_q.float() * x_scale.repeat_interleave(group_size, dim=-1)[:, : x_q.shape[-1]]


# A kernel that already holds a row of activations (a norm) can quantise it on the way out, saving its FP8
# consumer a launch. The groups travel on the tensor object itself: any view or copy of it is a new object
# without them, so a consumer can never read groups of other values, and without groups it quantises itself.
_TOKEN_GROUPS = "_fp8_token_groups"


def attach_token_groups(x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Records per_token_group_quant_fp8(x, group_size) = (x_q, x_scale) on x; returns x."""
    setattr(x, _TOKEN_GROUPS, (group_size, x_q, x_scale))
    return x


def attached_token_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x_q, x_scale) recorded on this very tensor for this group size, else None."""
    groups = getattr(x, _TOKEN_GROUPS, None)
    if groups is None or groups[0] != group_size:
        return None
    return groups[1], groups[2]


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """[T, ...] -> the [T, K] view of the same features, with the groups attached to x (which cover each
    token's K features)."""
    flat = x.reshape(x.shape[0], -1)
    if hasattr(x, _TOKEN_GROUPS):
        setattr(flat, _TOKEN_GROUPS, getattr(x, _TOKEN_GROUPS))
    return flat
