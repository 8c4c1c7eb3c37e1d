"""The Gated DeltaNet's output norm in one pass, Triton (torch reference: worker.kernels.gated_rms_norm).

One program per block of rows reads x and z once and writes y: the reference's dozen small ops
(each a launch at decode batch sizes) become one. Roundings follow the reference: the normed row
in the activation dtype, times the weight in its dtype, then the gate in fp32.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_paged_attention import _check


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _gated_rms_norm_kernel(x, z, weight, out, R, H, V, stride_xt, stride_xh, stride_zt, stride_zh, eps,
                           BR: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
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
    tl.store(out + rows.to(tl.int64)[:, None] * V + cols[None, :], (y * zf * tl.sigmoid(zf)).to(out.dtype.element_ty),
             mask=mask)


def gated_rms_norm(
    x: torch.Tensor,  # [R, V] or [T, H, V]
    z: torch.Tensor,  # the same shape; any strides but the last
    weight: torch.Tensor,  # [V]
    eps: float,
) -> torch.Tensor:  # x's shape, contiguous, in x's dtype
    _check(x.dim() in (2, 3) and z.shape == x.shape,
           f"x and z must be [R, V] or [T, H, V] alike, got {tuple(x.shape)}, {tuple(z.shape)}")
    V = x.shape[-1]
    _check(weight.shape == (V,), f"weight must be [{V}], got {tuple(weight.shape)}")
    out = _empty_output(x)
    x3, z3 = (x, z) if x.dim() == 3 else (x[:, None], z[:, None])
    x3 = x3 if x3.stride(2) == 1 else x3.contiguous()
    z3 = z3 if z3.stride(2) == 1 else z3.contiguous()
    T, H = x3.shape[:2]
    if T * H:
        BV = triton.next_power_of_2(V)
        BR = max(1, min(16, 4096 // BV))
        _gated_rms_norm_kernel[(triton.cdiv(T * H, BR),)](
            x3, z3, weight, out, T * H, H, V, x3.stride(0), x3.stride(1), z3.stride(0), z3.stride(1), eps,
            BR=BR, BV=BV, num_warps=4, **pdl_launch(x.device))
    return out
