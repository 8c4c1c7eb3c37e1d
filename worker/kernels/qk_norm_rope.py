"""The gated attention's query/key preparation and KV-cache write as one op, torch reference.

Zero-centred RMSNorm of each query and key head (fp32, `y * (1 + w)`, rounded to the input dtype),
then NeoX rotary on the first `rotary_dim` dims of every head (in fp32, rounded), then the key and
value written to their cache slots (`reshape_and_cache`, PAD slots skipped). The layers'
`RMSNorm` and `PartialRotaryEmbedding` use the same two functions, so the model has one definition.
"""

import torch
import torch.nn.functional as F

from worker.kernels.paged_attention import reshape_and_cache


def rms_norm_zero_centred(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] or one row per leading index ([..., D] broadcast)."""
    xf = x.float()
    scale = 1.0 + weight.float()
    if scale.dim() == 1:  # rms_norm multiplies by its weight last: the same bits as the product below, one op less
        return F.rms_norm(xf, xf.shape[-1:], scale, eps).to(x.dtype)
    y = F.rms_norm(xf, xf.shape[-1:], eps=eps)  # xf * rsqrt(mean(xf^2) + eps), bit for bit, in one op
    return (y * scale).to(x.dtype)


def rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, rotary_dim / 2] -> x with its first rotary_dim dims rotated (NeoX halves)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


def qk_norm_rope_and_cache(
    query: torch.Tensor,  # [T, H, D], may be a strided view (q_proj interleaves query and gate)
    key: torch.Tensor,  # [T, H_kv, D]
    value: torch.Tensor,  # [T, H_kv, D]
    q_norm_weight: torch.Tensor,  # [D]
    k_norm_weight: torch.Tensor,  # [D]
    eps: float,
    cos_sin: torch.Tensor,  # [max_position, rotary_dim] fp32: cos of each frequency, then sin
    positions: torch.Tensor,  # [T]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    slot_mapping: torch.Tensor,  # [T], negative slots are skipped
) -> torch.Tensor:  # [T, H, D] the normed, rotated query
    # Norm and rotation act on each head alone: the query and key heads go through them together.
    heads, kv_heads = query.shape[1], key.shape[1]
    weight = torch.cat([q_norm_weight.expand(heads, -1), k_norm_weight.expand(kv_heads, -1)])  # [H + H_kv, D]
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    qk = rms_norm_zero_centred(torch.cat([query, key], dim=1), weight, eps)
    q, k = rotate_partial(qk, cos, sin, cos_sin.shape[-1]).split([heads, kv_heads], dim=1)
    reshape_and_cache(k, value, k_cache, v_cache, slot_mapping)
    return q
