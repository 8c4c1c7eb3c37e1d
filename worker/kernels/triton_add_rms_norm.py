"""Residual add + zero-centred RMSNorm in one pass, and the norm alone, Triton (torch reference:
worker.kernels.add_rms_norm).

One program per token reads x and the residual once, writes the new residual and the normed row:
two launches' worth of traffic (and six small ops) become one. The sum is rounded to the activation
dtype before the norm, as the reference's separate add leaves it.

Given `quant_block`, the same program also quantises the normed row to e4m3 per group of that many
features for an FP8 consumer, with per_token_group_quant_fp8's rounding (bit for bit): one launch
fewer per norm on the way into an FP8 projection or MoE.

`fused_add_rms_norm_linear` folds the norm into the small linear layer after it (the MoE's router) at
decode sizes: every program of the GEMV norms the few rows itself (a row is 2048 features, read from
L2) before multiplying its BN weight rows, which it loaded before waiting for the kernel before; program
p also writes groups p, p + P, ... of the normed rows, the new residual and the e4m3 groups. The norm's
own launch, and its round trip through memory, leave the step's chain.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels import triton_linear
from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, attach_token_groups, cdiv
from worker.kernels.fp8.triton import _quantize_groups
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_paged_attention import _check


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _add_rms_norm_kernel(x, residual, weight, out, new_residual, x_q, x_scale, stride_x, stride_r, stride_o, stride_n,
                         stride_q, stride_s, H, eps, BH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, G: tl.constexpr,
                         QUANT: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    mask = h < H
    r = tl.load(x + t * stride_x + h, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = r + tl.load(residual + t * stride_r + h, mask=mask, other=0.0)
        tl.store(new_residual + t * stride_n + h, r, mask=mask)
    _norm_row(r, t, h, weight, out, x_q, x_scale, stride_o, stride_q, stride_s, H, eps, BH, G, QUANT, FP8_MAX_,
              MIN_AMAX_)


@triton.jit
def _norm_row(r, t, h, weight, out, x_q, x_scale, stride_o, stride_q, stride_s, H, eps, BH: tl.constexpr,
              G: tl.constexpr, QUANT: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr):
    """Row t's norm of r [BH] (0 past H) into out, and with QUANT its e4m3 groups of G into x_q / x_scale."""
    mask = h < H
    rf = r.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(rf * rf, 0) / H + eps)
    w = tl.load(weight + h, mask=mask, other=0.0).to(tl.float32)
    y = (rf * rstd * (1.0 + w)).to(out.dtype.element_ty)
    tl.store(out + t * stride_o + h, y, mask=mask)
    if QUANT:  # the stored row, in groups of G (BH is a multiple of G; padding is 0 and never stored)
        groups = tl.reshape(y.to(tl.float32), (BH // G, G))
        q, scale = _quantize_groups(groups, FP8_MAX_, MIN_AMAX_)
        g = tl.arange(0, BH // G)
        cols = g[:, None] * G + tl.arange(0, G)[None, :]
        tl.store(x_q + t * stride_q + cols, q.to(x_q.dtype.element_ty), mask=cols < H)
        tl.store(x_scale + t * stride_s + g, scale, mask=g * G < H)


@triton.jit
def _add_rms_norm_gemv_kernel(x, residual, weight, w, y, out, new_residual, x_q, x_scale, T, N, H, eps, PROGRAMS,
                              stride_x, stride_r, stride_w, stride_y, stride_o, stride_n, stride_q, stride_s,
                              TP: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                              ROUNDS: tl.constexpr, QUANT: tl.constexpr, FP8_MAX_: tl.constexpr,
                              MIN_AMAX_: tl.constexpr, PDL: tl.constexpr):
    """y[t, n] = normed row t . w[n] for this program's BN rows n; the norm as _add_rms_norm_kernel's."""
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    nmask = n < N
    h = tl.arange(0, BH)
    hmask = h < H
    wv = tl.load(w + n.to(tl.int64)[:, None] * stride_w + h[None, :], mask=nmask[:, None] & hmask[None, :], other=0.0)
    nw = tl.load(weight + h, mask=hmask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    t = tl.arange(0, TP).to(tl.int64)
    tmask = t < T
    rows = tmask[:, None] & hmask[None, :]
    r = (tl.load(x + t[:, None] * stride_x + h[None, :], mask=rows, other=0.0)
         + tl.load(residual + t[:, None] * stride_r + h[None, :], mask=rows, other=0.0))
    rf = r.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(rf * rf, 1) / H + eps)  # [TP]
    normed = (rf * rstd[:, None] * (1.0 + nw[None, :])).to(out.dtype.element_ty)
    acc = tl.sum(wv.to(tl.float32)[:, None, :] * normed.to(tl.float32)[None, :, :], 2)  # [BN, TP]
    tl.store(y + t[None, :] * stride_y + n[:, None], acc.to(y.dtype.element_ty), mask=nmask[:, None] & tmask[None, :])
    for i in tl.static_range(ROUNDS):  # this program's share of the rows' groups: pid, pid + PROGRAMS, ...
        g = pid + i * PROGRAMS
        cols = g * G + tl.arange(0, G)
        part = tmask[:, None] & (cols < H)[None, :]
        rg = (tl.load(x + t[:, None] * stride_x + cols[None, :], mask=part, other=0.0)
              + tl.load(residual + t[:, None] * stride_r + cols[None, :], mask=part, other=0.0))
        wg = tl.load(weight + cols, mask=cols < H, other=0.0).to(tl.float32)
        yg = (rg.to(tl.float32) * rstd[:, None] * (1.0 + wg[None, :])).to(out.dtype.element_ty)
        tl.store(new_residual + t[:, None] * stride_n + cols[None, :], rg, mask=part)
        tl.store(out + t[:, None] * stride_o + cols[None, :], yg, mask=part)
        if QUANT:  # one group per row: the token's group g
            q, scale = _quantize_groups(yg.to(tl.float32), FP8_MAX_, MIN_AMAX_)
            tl.store(x_q + t[:, None] * stride_q + cols[None, :], q.to(x_q.dtype.element_ty), mask=part)
            tl.store(x_scale + t * stride_s + g, scale, mask=tmask & (g * G < H))


NORM_GEMV_MAX_TOKENS = 4  # the fused norm + GEMV up to here (its row tile is BN x tokens <= 4 rows of H)
NORM_GEMV_MAX_FEATURES = 8192  # a program holds every feature of its rows


def fused_add_rms_norm_linear(
    x: torch.Tensor,  # [T, H] the sublayer's output
    residual: torch.Tensor,  # [T, H] the residual stream so far
    weight: torch.Tensor,  # [H]
    eps: float,
    linear_weight: torch.Tensor,  # [N, H] in x's dtype
    quant_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (y [T, N], normed [T, H], new residual [T, H])
    """fused_add_rms_norm, then the normed rows times linear_weight: one launch up to NORM_GEMV_MAX_TOKENS
    tokens, else the norm and kernels.linear's path."""
    _check(x.dim() == 2 and residual.shape == x.shape, f"x and residual must be [T, H], got {tuple(x.shape)}, "
                                                       f"{tuple(residual.shape)}")
    T, H = x.shape
    _check(linear_weight.dim() == 2 and linear_weight.shape[1] == H and linear_weight.dtype == x.dtype,
           f"linear_weight must be [N, {H}] in {x.dtype}, got {tuple(linear_weight.shape)} in {linear_weight.dtype}")
    if T > NORM_GEMV_MAX_TOKENS or H > NORM_GEMV_MAX_FEATURES or linear_weight.stride(1) != 1 or T == 0:
        normed, new_residual = fused_add_rms_norm(x, residual, weight, eps, quant_block)
        return triton_linear.linear(normed, linear_weight), normed, new_residual
    _check(weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}")
    _check(x.dtype == residual.dtype, f"x and residual must share a dtype, got {x.dtype}, {residual.dtype}")
    _check(x.stride(1) == 1 and residual.stride(1) == 1, "x and residual must be contiguous in their last dim")
    N = linear_weight.shape[0]
    out, new_residual, y = _empty_output(x), _empty_output(x), _empty_output(x, (T, N))
    quant = quant_block is not None
    x_q = torch.empty(T, H, dtype=FP8_DTYPE, device=x.device) if quant else out
    x_scale = torch.empty(T, cdiv(H, quant_block), dtype=torch.float32, device=x.device) if quant else out
    BH = triton.next_power_of_2(H)
    G = quant_block or min(BH, 256)
    TP = triton.next_power_of_2(T)
    BN = max(1, 4 // TP)
    programs = triton.cdiv(N, BN)
    _add_rms_norm_gemv_kernel[(programs,)](
        x, residual, weight, linear_weight, y, out, new_residual, x_q, x_scale, T, N, H, eps, programs, x.stride(0),
        residual.stride(0), linear_weight.stride(0), y.stride(0), out.stride(0), new_residual.stride(0), x_q.stride(0),
        x_scale.stride(0), TP=TP, BH=max(BH, G), BN=BN, G=G, ROUNDS=cdiv(cdiv(H, G), programs), QUANT=quant,
        FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX, num_warps=4, **pdl_launch(x.device))
    if quant:
        attach_token_groups(out, x_q, x_scale, quant_block)
    return y, out, new_residual


@dataclass
class _RowNormLaunch:
    """What a launch of one program per row that ends in _norm_row needs besides its own arguments: the
    e4m3 group buffers (out itself, unused, without quant_block), the tile and warps, and afterwards the
    groups attached to out."""

    x_q: torch.Tensor
    x_scale: torch.Tensor
    quant_block: int | None
    constants: dict

    def attach(self, out: torch.Tensor) -> None:
        if self.quant_block is not None:
            attach_token_groups(out, self.x_q, self.x_scale, self.quant_block)


def _row_norm_launch(out: torch.Tensor, quant_block: int | None) -> _RowNormLaunch:
    T, H = out.shape
    quant = quant_block is not None
    x_q = torch.empty(T, H, dtype=FP8_DTYPE, device=out.device) if quant else out
    x_scale = torch.empty(T, cdiv(H, quant_block), dtype=torch.float32, device=out.device) if quant else out
    G = quant_block or triton.next_power_of_2(H)
    BH = max(triton.next_power_of_2(H), G)
    return _RowNormLaunch(x_q, x_scale, quant_block, dict(BH=BH, G=G, QUANT=quant, FP8_MAX_=FP8_MAX,
                                                          MIN_AMAX_=MIN_AMAX, num_warps=min(16, max(1, BH // 256))))


def _launch(x, residual, weight, eps, out, new_residual, quant_block):
    """One program per token; with quant_block, also the e4m3 groups, attached to out."""
    T, H = x.shape
    norm = _row_norm_launch(out, quant_block)
    if T:
        _add_rms_norm_kernel[(T,)](x, residual, weight, out, new_residual, norm.x_q, norm.x_scale, x.stride(0),
                                   residual.stride(0), out.stride(0), new_residual.stride(0), norm.x_q.stride(0),
                                   norm.x_scale.stride(0), H, eps, HAS_RESIDUAL=residual is not x, **norm.constants,
                                   **pdl_launch(x.device))
    norm.attach(out)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H] the sublayer's output
    residual: torch.Tensor,  # [T, H] the residual stream so far
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,  # also quantise the normed rows in groups of this many features (a power of 2)
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
    _check(x.dim() == 2 and residual.shape == x.shape, f"x and residual must be [T, H], got {tuple(x.shape)}, "
                                                       f"{tuple(residual.shape)}")
    _check(x.dtype == residual.dtype, f"x and residual must share a dtype, got {x.dtype}, {residual.dtype}")
    T, H = x.shape
    _check(weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}")
    _check(x.stride(1) == 1 and residual.stride(1) == 1, "x and residual must be contiguous in their last dim")
    out, new_residual = _empty_output(x), _empty_output(x)
    _launch(x, residual, weight, eps, out, new_residual, quant_block)
    return out, new_residual


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,
) -> torch.Tensor:  # [T, H]
    _check(x.dim() == 2, f"x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    _check(weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = _empty_output(x)
    _launch(x, x, weight, eps, out, out, quant_block)
    return out
