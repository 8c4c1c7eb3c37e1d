"""The Gated DeltaNet's output norm in one pass, Triton (torch reference: worker.kernels.gated_rms_norm).

One program per block of rows reads x and z once and writes y: the reference's dozen small ops
(each a launch at decode batch sizes) become one. Roundings follow the reference: the normed row
in the activation dtype, times the weight in its dtype, then the gate in fp32.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.triton_paged_attention import _check


def _empty_output(like: torch.Tensor) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty_like(like)


@triton.jit
def _gated_rms_norm_kernel(x, z, weight, out, R, V, stride_x, stride_z, stride_o, eps,
                           BR: tl.constexpr, BV: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    mask = (rows < R)[:, None] & (cols < V)[None, :]
    rows = rows.to(tl.int64)
    xv = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xf = xv.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / V + eps)
    normed = (xf * rstd[:, None]).to(xv.dtype)
    w = tl.load(weight + cols, mask=cols < V, other=0.0)
    y = (w[None, :] * normed).to(tl.float32)
    zf = tl.load(z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + rows[:, None] * stride_o + cols[None, :], (y * zf * tl.sigmoid(zf)).to(out.dtype.element_ty),
             mask=mask)


def gated_rms_norm(
    x: torch.Tensor,  # [R, V]
    z: torch.Tensor,  # [R, V]
    weight: torch.Tensor,  # [V]
    eps: float,
) -> torch.Tensor:  # [R, V] in x's dtype
    _check(x.dim() == 2 and z.shape == x.shape, f"x and z must be [R, V], got {tuple(x.shape)}, {tuple(z.shape)}")
    R, V = x.shape
    _check(weight.shape == (V,), f"weight must be [{V}], got {tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    z = z if z.stride(1) == 1 else z.contiguous()
    out = _empty_output(x)
    if R:
        BV = triton.next_power_of_2(V)
        BR = max(1, min(16, 4096 // BV))
        _gated_rms_norm_kernel[(triton.cdiv(R, BR),)](x, z, weight, out, R, V, x.stride(0), z.stride(0),
                                                       out.stride(0), eps, BR=BR, BV=BV, num_warps=4)
    return out
