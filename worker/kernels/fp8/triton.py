"""Block-scaled FP8 linear layers, Triton kernels (same parameters as `worker.kernels.fp8.reference`).

Two launches: the activations are quantised to e4m3 per token and group of b features (b = the
weights' block, 128 in the published checkpoints), then one GEMM walks K one block at a time: an
e4m3 x e4m3 tensor-core product per [BM, b] x [b, BN] tile, scaled by the token groups' and the
weight blocks' scales and summed in float32 (the reference sums in float64; see its docstring).

A few tokens (decode, short verify) take one launch instead, a GEMV: one program per (token, BN
weight rows) quantises its token's features itself (the same rounding; a row is short), or with
`"prequant"` in its tile reads them from one per_token_group_quant_fp8 launch before it (a narrow
tile's programs all repeat the quantisation otherwise, on the path to their first product), walks K
NB blocks at a time, sums each block's e4m3 products in fp32 and scales them like the GEMM. The
weight rows are read from memory once, by the first token's program, and from L2 by the others; with
`"all_tokens"` in its tile one program takes every token of its rows instead, each weight tile in
registers once for all of them (the same sums, bit for bit).
"""

import functools
from pathlib import Path

import torch
import triton
import triton.language as tl

from worker.kernels import triton_linear
from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, cdiv, kernel_block, scale_shape
from worker.kernels.moe.tile_configs import tuned_entry_for
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_linear import _one_token_rows


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Outputs the kernels must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _round_to_e4m3(v):
    """fp32 values (|v| <= 448) -> the nearest e4m3 value, ties to even, still in fp32: the cast to
    e4m3 that follows is then exact (Triton's interpreter rounds its own fp8 casts wrongly: it loses
    the carry into the exponent and flushes subnormals)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; below 2^-6 the subnormal step 2^-9
    step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - step_exponent) << 23).to(tl.float32, bitcast=True)
    units = v * inv_step  # exact: a power of two, and |units| < 16
    rounded = (units + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds to an integer, ties to even
    return rounded * step


@triton.jit
def _token_group_quant_kernel(x, x_q, x_scale, stride_x, stride_q, stride_s, K, G: tl.constexpr,
                              BG: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, PDL: tl.constexpr):
    """One (token, group): scale so that the largest magnitude becomes FP8_MAX, round to e4m3."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * G + tl.arange(0, BG)
    mask = (tl.arange(0, BG) < G) & (cols < K)
    v = tl.load(x + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v), axis=0), MIN_AMAX_) / FP8_MAX_
    q = _round_to_e4m3(tl.clamp(tl.math.div_rn(v, scale), -FP8_MAX_, FP8_MAX_))
    tl.store(x_q + t * stride_q + cols, q.to(x_q.dtype.element_ty), mask=mask)
    tl.store(x_scale + t * stride_s + g, scale)


def per_token_group_quant_fp8(
    x: torch.Tensor,  # [T, K]
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_q [T, K] float8_e4m3fn, x_scale [T, ceil(K/g)] float32)
    tokens, features = x.shape
    num_groups = cdiv(features, group_size)
    x = x if x.stride(-1) == 1 else x.contiguous()
    x_q = torch.empty(tokens, features, dtype=FP8_DTYPE, device=x.device)
    x_scale = torch.empty(tokens, num_groups, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return x_q, x_scale
    _token_group_quant_kernel[(tokens, num_groups)](
        x, x_q, x_scale, x.stride(0), x_q.stride(0), x_scale.stride(0), features,
        G=group_size, BG=triton.next_power_of_2(group_size), FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX, num_warps=1,
        **pdl_launch(x.device))
    return x_q, x_scale


@triton.jit
def _block_fp8_matmul_kernel(a, a_scale, b, b_scale, bias, c, M, N,
                             stride_am, stride_as, stride_bn, stride_bs, stride_cm,
                             K: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    """C[BM, BN] tile = sum over K blocks of (A_q . B_q^T) * a_scale[m, kb] * b_scale[n // BLOCK, kb]."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)  # grouped ordering: GROUP_M row tiles share each weight tile in L2
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask, nmask = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK)
    a_rows = a + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b + offs_n.to(tl.int64)[None, :] * stride_bn
    sa_rows = a_scale + offs_m.to(tl.int64) * stride_as
    sb_cols = b_scale + (offs_n // BLOCK).to(tl.int64) * stride_bs
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK)):
        k = kb * BLOCK + offs_k
        kmask = k < K
        x = tl.load(a_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(b_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        sa = tl.load(sa_rows + kb, mask=mmask, other=0.0)
        sb = tl.load(sb_cols + kb, mask=nmask, other=0.0)
        acc += tl.dot(x, w) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = c + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(out, acc.to(c.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _quantize_groups(v, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr):
    """[R, G] fp32 -> (e4m3 values in fp32 [R, G], scales [R]): each row one group, as the quant kernel."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=1), MIN_AMAX_) / FP8_MAX_
    return _round_to_e4m3(tl.clamp(tl.math.div_rn(v, scale[:, None]), -FP8_MAX_, FP8_MAX_)), scale


@triton.jit
def _block_fp8_gemv_kernel(x, x_q, x_s, b, b_scale, bias, c, dense_w, dense_y, M, N, DENSE_N, FP8_PROGRAMS,
                           stride_xm, stride_xqm, stride_xsm, stride_bn, stride_bs, stride_cm, stride_dwn, stride_dym,
                           K: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, BN: tl.constexpr,
                           TP: tl.constexpr, HAS_BIAS: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr,
                           PREQUANT: tl.constexpr, DENSE: tl.constexpr, DENSE_BN: tl.constexpr,
                           DENSE_BK: tl.constexpr, PDL: tl.constexpr):
    """c[m, BN rows] = sum over K blocks of (q(x[m]) . B_q^T) * x_scale[m, kb] * b_scale[n // BLOCK, kb], for
    the TP tokens m of this program (TP = 1: a program per token; more: each weight tile read once for all).
    With PREQUANT, q(x) and its scales come from per_token_group_quant_fp8 (x_q, x_s) instead of each
    program quantising x again. With DENSE, the programs from FP8_PROGRAMS on multiply x instead by
    DENSE_BN rows each of a weight in x's dtype, into dense_y [M, DENSE_N]."""
    m0 = tl.program_id(1).to(tl.int64) * TP
    if DENSE:
        if tl.program_id(0) >= FP8_PROGRAMS:
            for i in tl.static_range(TP):
                if m0 + i < M:
                    _one_token_rows(x + (m0 + i) * stride_xm, dense_w, dense_y + (m0 + i) * stride_dym, DENSE_N,
                                    stride_dwn, tl.program_id(0) - FP8_PROGRAMS, K, DENSE_BN, DENSE_BK, PDL)
            return
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    nb = tl.arange(0, NB)
    k2 = nb[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [NB, BLOCK]: NB groups, loaded as such (no reshape)
    b_rows = b + offs_n.to(tl.int64)[:, None, None] * stride_bn + k2[None, :, :]
    sb_rows = b_scale + (offs_n // BLOCK).to(tl.int64)[:, None] * stride_bs
    w = tl.load(b_rows, mask=nmask[:, None, None] & (k2 < K)[None, :, :], other=0.0)  # before the PDL wait
    pdl_enter(PDL)
    if TP == 1:  # its own branch: written as the TP case below, the one-token build took 108 registers, not 48
        acc = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, K, NB * BLOCK):
            kmask = k0 + k2 < K
            kb = k0 // BLOCK + nb
            xq, xs = _token_groups(x, x_q, x_s, m0, k0, k2, kb, kmask, True, stride_xm, stride_xqm, stride_xsm, K,
                                   BLOCK, FP8_MAX_, MIN_AMAX_, PREQUANT)
            blocks = tl.sum(w.to(tl.float32) * xq[None, :, :], 2)  # [BN, NB]
            sb = tl.load(sb_rows + kb[None, :], mask=nmask[:, None] & (kb * BLOCK < K)[None, :], other=0.0)
            acc += tl.sum(blocks * xs[None, :] * sb, 1)
            w = tl.load(b_rows + k0 + NB * BLOCK, mask=nmask[:, None, None] & (k0 + NB * BLOCK + k2 < K)[None, :, :],
                        other=0.0)  # the next step's tile
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(c + m0 * stride_cm + offs_n, acc.to(c.dtype.element_ty), mask=nmask)
    else:  # the same sums per token, each weight tile used for all TP tokens while in registers
        t = tl.arange(0, TP)
        acc2 = tl.zeros([TP, BN], dtype=tl.float32)
        for k0 in range(0, K, NB * BLOCK):
            kmask = k0 + k2 < K
            kb = k0 // BLOCK + nb
            sb = tl.load(sb_rows + kb[None, :], mask=nmask[:, None] & (kb * BLOCK < K)[None, :], other=0.0)
            for i in tl.static_range(TP):
                xq, xs = _token_groups(x, x_q, x_s, m0 + i, k0, k2, kb, kmask, m0 + i < M, stride_xm, stride_xqm,
                                       stride_xsm, K, BLOCK, FP8_MAX_, MIN_AMAX_, PREQUANT)
                blocks = tl.sum(w.to(tl.float32) * xq[None, :, :], 2)
                acc2 = tl.where((t == i)[:, None], acc2 + tl.sum(blocks * xs[None, :] * sb, 1)[None, :], acc2)
            w = tl.load(b_rows + k0 + NB * BLOCK, mask=nmask[:, None, None] & (k0 + NB * BLOCK + k2 < K)[None, :, :],
                        other=0.0)
        if HAS_BIAS:
            acc2 += tl.load(bias + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(c + (m0 + t)[:, None] * stride_cm + offs_n[None, :], acc2.to(c.dtype.element_ty),
                 mask=(m0 + t < M)[:, None] & nmask[None, :])


@triton.jit
def _token_groups(x, x_q, x_s, m, k0, k2, kb, kmask, here, stride_xm, stride_xqm, stride_xsm, K: tl.constexpr,
                  BLOCK: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, PREQUANT: tl.constexpr):
    """Token m's e4m3 features [NB, BLOCK] (in fp32) and their scales [NB] for the K step at k0: from
    per_token_group_quant_fp8's output with PREQUANT (the same rounding, done once for every program), else
    quantised here; zeros where `here` is false."""
    if PREQUANT:
        xq = tl.load(x_q + m * stride_xqm + k0 + k2, mask=kmask & here, other=0.0).to(tl.float32)
        xs = tl.load(x_s + m * stride_xsm + kb, mask=(kb * BLOCK < K) & here, other=0.0)
    else:
        xk = tl.load(x + m * stride_xm + k0 + k2, mask=kmask & here, other=0.0).to(tl.float32)
        xq, xs = _quantize_groups(xk, FP8_MAX_, MIN_AMAX_)  # [NB, BLOCK], [NB]
    return xq, xs


def gemv_features(x: torch.Tensor, block: int, prequant: bool, x_groups=None):
    """-> (PREQUANT, x_q, x_s) for a GEMV-style kernel over x's tokens: the groups given (a norm's), else
    one per_token_group_quant_fp8 launch when the tile asks for it, else x twice (each program quantises)."""
    if x_groups is not None:
        return True, *x_groups
    return (True, *per_token_group_quant_fp8(x, block)) if prequant else (False, x, x)


GEMV_MAX_TOKENS = 4  # the GEMV's default up to here
CONFIG_DIR = Path(__file__).parent / "configs"


def default_gemv_tile(N: int) -> dict:
    """Narrow row tiles so that even a 2048-row weight spreads over every multiprocessor."""
    return dict(gemv=True, BN=8 if N >= 8192 else 4, NB=4, num_warps=4)


def config_file_name(n: int, k: int, block: int, device: str) -> str:
    return f"N={n},K={k},block={block},device={device}.json"


@functools.lru_cache(maxsize=4096)  # per layer per step: off the hot path
def get_tile(m: int, n: int, k: int, block: int, device: torch.device) -> dict:
    """The tile tuned for this weight shape on this device (benchmarks/tune_fp8.py) at the nearest token
    count, else the defaults: the GEMV up to GEMV_MAX_TOKENS, the GEMM beyond."""
    tuned = tuned_entry_for(device, lambda name: CONFIG_DIR / config_file_name(n, k, block, name), m)
    if tuned is not None:
        return tuned
    return default_gemv_tile(n) if m <= GEMV_MAX_TOKENS else default_tile(m, n)


def default_tile(M: int, N: int) -> dict:
    """Launch shape from the token count: memory-bound small tiles for decode, larger for prefill."""
    if M <= 16:
        return dict(BM=16, BN=64, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BM=32, BN=128, GROUP_M=4, num_warps=4, num_stages=4)
    return dict(BM=64, BN=128, GROUP_M=8, num_warps=4, num_stages=3)


def _check_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: int) -> None:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be {FP8_DTYPE}, got {weight.dtype}")
    expected = scale_shape((n, k), block)
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv must be [{expected[0]}, {expected[1]}] for a [{n}, {k}] weight "
                         f"in blocks of {block}, got {tuple(weight_scale_inv.shape)}")
    if weight.stride(-1) != 1 or weight_scale_inv.stride(-1) != 1:
        raise ValueError("weight and weight_scale_inv must be contiguous in their last dimension")
    if not kernel_block(block):
        raise ValueError(f"the FP8 kernel needs a power-of-two block of at least 16, got {block}")


def gemv_tokens_per_program(tile: dict, tokens: int) -> int:
    """A GEMV tile's tokens per program: all of them (each weight tile read once) with "all_tokens", else one
    (a program per token and row tile, the weight read once per token)."""
    return triton.next_power_of_2(tokens) if tile.get("all_tokens") else 1


def _gemv(x2, weight, weight_scale_inv, block, bias, out, tile, x_groups, dense=None) -> None:
    """The GEMV launch into out [M, N]; dense = (weight [DN, K] in x's dtype, its output [M, DN], its tile)
    gives that weight's rows programs of their own in the same launch."""
    n, k = weight.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    prequant, x_q, x_s = gemv_features(x2, block, bool(tile.get("prequant")), x_groups)
    fp8_programs = triton.cdiv(n, tile["BN"])
    dense_w, dense_y, dense_tile = dense if dense is not None else (out, out, dict(BN=1, BK=16))
    dense_n = dense_w.shape[0] if dense is not None else 0
    m = x2.shape[0]
    tp = gemv_tokens_per_program(tile, m)
    _block_fp8_gemv_kernel[(fp8_programs + triton.cdiv(dense_n, dense_tile["BN"]), triton.cdiv(m, tp))](
        x2, x_q, x_s, weight, weight_scale_inv.float(), bias if bias is not None else out, out, dense_w, dense_y, m,
        n, dense_n, fp8_programs, x2.stride(0), x_q.stride(0), x_s.stride(0), weight.stride(0),
        weight_scale_inv.stride(0), out.stride(0), dense_w.stride(0), dense_y.stride(0),
        K=k, BLOCK=block, NB=tile["NB"], BN=tile["BN"], TP=tp, HAS_BIAS=bias is not None, FP8_MAX_=FP8_MAX,
        MIN_AMAX_=MIN_AMAX, PREQUANT=prequant, DENSE=dense is not None, DENSE_BN=dense_tile["BN"],
        DENSE_BK=dense_tile["BK"], num_warps=tile["num_warps"], **pdl_launch(x2.device))


def w8a8_block_fp8_linear(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    bias: torch.Tensor | None = None,  # [N]
    tile: dict | None = None,  # the GEMM's {BM, BN, GROUP_M, ...}, the GEMV's {gemv, BN, NB, [prequant, all_tokens]}
    x_groups: tuple[torch.Tensor, torch.Tensor] | None = None,  # per_token_group_quant_fp8(x as [T, K], block)
) -> torch.Tensor:  # [T, N] activation dtype
    """y = dequant(quant(x)) @ dequant(weight).T + bias, summed in float32."""
    _check_fp8_linear(x, weight, weight_scale_inv, block)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = _empty_output(x, (m, n))
    if m == 0:
        return out.reshape(*lead, n)
    tile = tile or get_tile(m, n, k, block, x.device)
    if tile.get("gemv"):
        _gemv(x2, weight, weight_scale_inv, block, bias, out, tile, x_groups)
        return out.reshape(*lead, n)
    x_q, x_scale = x_groups or per_token_group_quant_fp8(x2, block)
    grid = (triton.cdiv(m, tile["BM"]) * triton.cdiv(n, tile["BN"]),)
    _block_fp8_matmul_kernel[grid](
        x_q, x_scale, weight, weight_scale_inv.float(), bias if bias is not None else out, out, m, n,
        x_q.stride(0), x_scale.stride(0), weight.stride(0), weight_scale_inv.stride(0), out.stride(0),
        K=k, BLOCK=block, BM=tile["BM"], BN=tile["BN"], GROUP_M=tile["GROUP_M"], HAS_BIAS=bias is not None,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], **pdl_launch(x.device)
    )
    return out.reshape(*lead, n)


# The dense rows' programs hold at most this many weight elements (a whole row of 2048 at one token), so
# that the launch needs no more registers than the FP8 GEMV's own tiles (ptxas: 48 a thread at the H200's
# qkvz tile, 72 with [4, 1024] dense tiles; benchmarks/kernel_registers.py).
DENSE_TILE_ELEMENTS = 2048


def dense_rows_tile(k: int) -> dict:
    """{BN, BK} of the dense rows: the whole K in one step where it fits, one row per program."""
    bk = min(triton.next_power_of_2(k), DENSE_TILE_ELEMENTS)
    return dict(BN=max(1, DENSE_TILE_ELEMENTS // bk), BK=bk)


def w8a8_block_fp8_linear_with_dense(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    dense_weight: torch.Tensor,  # [DN, K] in x's dtype
    tile: dict | None = None,  # the FP8 layer's tile, as w8a8_block_fp8_linear takes it
    dense_tile: dict | None = None,  # {BN, BK} of the dense rows
    x_groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, N], [T, DN])
    """(w8a8_block_fp8_linear(x, weight, ...), x @ dense_weight.T) in one launch where the FP8 layer takes
    its GEMV at this token count (the dense weight's rows get programs of their own); else two calls."""
    _check_fp8_linear(x, weight, weight_scale_inv, block)
    if dense_weight.dtype != x.dtype or dense_weight.dim() != 2 or dense_weight.shape[1] != weight.shape[1]:
        raise ValueError(f"dense_weight must be [DN, {weight.shape[1]}] in {x.dtype}, got "
                         f"{tuple(dense_weight.shape)} in {dense_weight.dtype}")
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    tile = tile or (get_tile(m, n, k, block, x.device) if m else None)
    if not m or not tile.get("gemv") or dense_weight.stride(1) != 1:
        return (w8a8_block_fp8_linear(x, weight, weight_scale_inv, block, tile=tile, x_groups=x_groups),
                triton_linear.linear(x, dense_weight))
    dense_n = dense_weight.shape[0]
    dense_tile = dense_tile or dense_rows_tile(k)
    out = _empty_output(x, (m, n))
    dense_out = _empty_output(x, (m, dense_n))
    _gemv(x2, weight, weight_scale_inv, block, None, out, tile, x_groups, (dense_weight, dense_out, dense_tile))
    lead = x.shape[:-1]
    return out.reshape(*lead, n), dense_out.reshape(*lead, dense_n)
