"""Query/key norm, partial rotary and the KV-cache write in one Triton kernel (torch reference:
worker.kernels.qk_norm_rope), replacing about twenty small launches per attention layer.

One program per token holds all of its query heads, key heads and value heads. A rotated dim d
needs its NeoX partner (d +- rotary_dim / 2), so the head is loaded twice, once in partner order;
both copies are normalised with the same per-head rsqrt. Roundings follow the reference: the norm's
output is rounded to the input dtype before the rotation, which is done in fp32 and rounded again.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_paged_attention import _check, _check_caches


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _norm_rope(ptr, row_stride, weight, cos, sin, nh, eps, D, HALF: tl.constexpr, BH: tl.constexpr,
               BD: tl.constexpr):
    """[BH, BD] heads at ptr (head stride row_stride) -> normed and rotated, fp32 (rounded as the reference)."""
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    mask = (h < nh)[:, None] & (d < D)[None, :]
    rotated_dim = d < 2 * HALF
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    partner = tl.where(rotated_dim, partner, d)
    x = tl.load(ptr + h[:, None] * row_stride + d[None, :], mask=mask, other=0.0)
    xp = tl.load(ptr + h[:, None] * row_stride + partner[None, :], mask=mask, other=0.0)
    xf, xpf = x.to(tl.float32), xp.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)[:, None]
    w = tl.load(weight + d, mask=d < D, other=0.0).to(tl.float32)
    wp = tl.load(weight + partner, mask=d < D, other=0.0).to(tl.float32)
    n = (xf * rstd * (1.0 + w[None, :])).to(x.dtype).to(tl.float32)
    np_ = (xpf * rstd * (1.0 + wp[None, :])).to(x.dtype).to(tl.float32)
    freq = tl.where(d < HALF, d, d - HALF)
    c = tl.load(cos + freq, mask=rotated_dim, other=1.0)[None, :]
    s = tl.load(sin + freq, mask=rotated_dim, other=0.0)[None, :]
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]
    out = tl.where(rotated_dim[None, :], n * c + sign * np_ * s, n)
    return out, h, d, mask


@triton.jit
def _qk_norm_rope_cache_kernel(
    query, key, value, q_weight, k_weight, cos_sin, positions, k_cache, v_cache, slot_mapping, q_out,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_o_t, stride_o_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h, stride_cs,
    H, HKV, D, BLOCK_SIZE, eps,
    HALF: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    cos = cos_sin + pos * stride_cs
    sin = cos + HALF
    q, h, d, mask = _norm_rope(query + t * stride_q_t, stride_q_h, q_weight, cos, sin, H, eps, D, HALF, BH, BD)
    tl.store(q_out + t * stride_o_t + h[:, None] * stride_o_h + d[None, :], q.to(q_out.dtype.element_ty), mask=mask)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return
    k, hk, d, kmask = _norm_rope(key + t * stride_k_t, stride_k_h, k_weight, cos, sin, HKV, eps, D, HALF, BHK, BD)
    v = tl.load(value + t * stride_v_t + hk[:, None] * stride_v_h + d[None, :], mask=kmask)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(k_cache + block * stride_kc_b + offset * stride_kc_s + hk[:, None] * stride_kc_h + d[None, :],
             k.to(k_cache.dtype.element_ty), mask=kmask)
    tl.store(v_cache + block * stride_vc_b + offset * stride_vc_s + hk[:, None] * stride_vc_h + d[None, :],
             v.to(v_cache.dtype.element_ty), mask=kmask)


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
    _check(query.dim() == 3 and key.dim() == 3 and value.shape == key.shape,
           f"query must be [T, H, D] and key, value [T, H_kv, D], got {tuple(query.shape)}, {tuple(key.shape)}, "
           f"{tuple(value.shape)}")
    T, H, D = query.shape
    HKV = key.shape[1]
    _check(key.shape[0] == T and key.shape[2] == D, f"key must be [{T}, H_kv, {D}], got {tuple(key.shape)}")
    _check(query.stride(2) == 1 and key.stride(2) == 1 and value.stride(2) == 1,
           "query, key and value must be contiguous in their last dim")
    rotary_dim = cos_sin.shape[-1]
    _check(rotary_dim % 2 == 0 and rotary_dim <= D, f"rotary dim {rotary_dim} must be even and at most {D}")
    _check(cos_sin.stride(-1) == 1 and cos_sin.dtype == torch.float32, "cos_sin must be contiguous fp32")
    _check_caches(k_cache, v_cache)
    _check(tuple(k_cache.shape[2:]) == (HKV, D), f"caches must be [num_blocks, block_size, {HKV}, {D}], "
                                                 f"got {tuple(k_cache.shape)}")
    _check(slot_mapping.shape == (T,) and positions.shape == (T,), f"positions and slot_mapping must be [{T}]")
    q_out = _empty_output(query, (T, H, D))
    if T == 0:
        return q_out
    _qk_norm_rope_cache_kernel[(T,)](
        query, key, value, q_norm_weight, k_norm_weight, cos_sin, positions, k_cache, v_cache, slot_mapping, q_out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos_sin.stride(0),
        H, HKV, D, k_cache.shape[1], eps,
        HALF=rotary_dim // 2, BH=triton.next_power_of_2(H), BHK=triton.next_power_of_2(HKV),
        BD=triton.next_power_of_2(D), num_warps=4 if H * D <= 2048 else 8, **pdl_launch(query.device)
    )
    return q_out
