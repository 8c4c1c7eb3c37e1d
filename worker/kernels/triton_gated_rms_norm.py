"""The Gated DeltaNet's output norm in one pass, Triton (torch reference: worker.kernels.gated_rms_norm).

One program per block of rows reads x and z once and writes y: the reference's dozen small ops
(each a launch at decode batch sizes) become one. Roundings follow the reference: the normed row
in the activation dtype, times the weight in its dtype, then the gate in fp32.

Given `quant_block` (a power of two dividing V, itself a power of two), the programs also quantise
their output rows to e4m3 per group of that many features, with per_token_group_quant_fp8's rounding
bit for bit, for the FP8 out projection that reads them: one launch fewer.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, attach_token_groups, quantisable
from worker.kernels.fp8.triton import _quantize_groups
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_paged_attention import _check


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _gated_rms_norm_kernel(x, z, weight, out, x_q, x_scale, R, H, V, stride_xt, stride_xh, stride_zt, stride_zh, eps,
                           BR: tl.constexpr, BV: tl.constexpr, G: tl.constexpr, QUANT: tl.constexpr,
                           FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, PDL: tl.constexpr):
    """Rows r = (token r // H, head r % H) of x and z, each V features."""
    pdl_enter(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    mask = (rows < R)[:, None] & (cols < V)[None, :]
    t, h = (rows // H).to(tl.int64), (rows % H).to(tl.int64)
    xv = tl.load(x + (t * stride_xt + h * stride_xh)[:, None] + cols[None, :], mask=mask, other=0.0)
    xf = xv.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / V + eps)
    normed = (xf * rstd[:, None]).to(xv.dtype)
    w = tl.load(weight + cols, mask=cols < V, other=0.0)
    y = (w[None, :] * normed).to(tl.float32)
    zf = tl.load(z + (t * stride_zt + h * stride_zh)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gated = (y * zf * tl.sigmoid(zf)).to(out.dtype.element_ty)
    tl.store(out + rows.to(tl.int64)[:, None] * V + cols[None, :], gated, mask=mask)
    if QUANT:  # BV == V: the rows are contiguous, so group i of the block is group first + i of the output
        q, scale = _quantize_groups(tl.reshape(gated.to(tl.float32), (BR * BV // G, G)), FP8_MAX_, MIN_AMAX_)
        i = tl.arange(0, BR * BV // G)
        first = tl.program_id(0).to(tl.int64) * (BR * BV // G)
        valid = first + i < R * (V // G)
        flat = (first + i)[:, None] * G + tl.arange(0, G)[None, :]
        tl.store(x_q + flat, q.to(x_q.dtype.element_ty), mask=valid[:, None])
        tl.store(x_scale + first + i, scale, mask=valid)


def gated_rms_norm(
    x: torch.Tensor,  # [R, V] or [T, H, V]
    z: torch.Tensor,  # the same shape; any strides but the last
    weight: torch.Tensor,  # [V]
    eps: float,
    quant_block: int | None = None,  # also quantise each token's H * V outputs in groups of this many (quantisable)
) -> torch.Tensor:  # x's shape, contiguous, in x's dtype
    _check(x.dim() in (2, 3) and z.shape == x.shape,
           f"x and z must be [R, V] or [T, H, V] alike, got {tuple(x.shape)}, {tuple(z.shape)}")
    V = x.shape[-1]
    _check(weight.shape == (V,), f"weight must be [{V}], got {tuple(weight.shape)}")
    _check(quant_block is None or quantisable(V, quant_block),
           f"rows of {V} features cannot be quantised in groups of {quant_block} by this kernel")
    out = _empty_output(x)
    x3, z3 = (x, z) if x.dim() == 3 else (x[:, None], z[:, None])
    x3 = x3 if x3.stride(2) == 1 else x3.contiguous()
    z3 = z3 if z3.stride(2) == 1 else z3.contiguous()
    T, H = x3.shape[:2]
    quant = quant_block is not None
    x_q = torch.empty(T, H * V, dtype=FP8_DTYPE, device=x.device) if quant else out
    x_scale = torch.empty(T, H * V // quant_block, dtype=torch.float32, device=x.device) if quant else out
    if T * H:
        BV = triton.next_power_of_2(V)
        BR = max(1, min(16, 4096 // BV))
        _gated_rms_norm_kernel[(triton.cdiv(T * H, BR),)](
            x3, z3, weight, out, x_q, x_scale, T * H, H, V, x3.stride(0), x3.stride(1), z3.stride(0), z3.stride(1),
            eps, BR=BR, BV=BV, G=quant_block or BV, QUANT=quant, FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX, num_warps=4,
            **pdl_launch(x.device))
    if quant:  # groups of each token's H * V features: the rows the out projection reads (flatten_tokens)
        attach_token_groups(out, x_q, x_scale, quant_block)
    return out
