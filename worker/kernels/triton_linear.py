"""Dense linear layers at a few tokens (decode, short verify): a GEMV in Triton where it beats cuBLAS.

At one to a few tokens a linear layer only streams its weight, and cuBLAS picks split-K GEMMs for
some of Qwen3-Next-80B's shapes (out_proj [2048, 4096]: 8.6 µs against 3.9 µs of bytes on an H200,
reduce kernel included). The GEMV gives each program BN weight rows and walks K in BK chunks,
multiplying every chunk with all T tokens' features at once (the weight is read once) and summing
in fp32; a row's result does not depend on the other rows or tokens of the call.

Which shapes take it is data: `benchmarks/tune_linear.py` times the GEMV's tiles against F.linear per
(N, K, dtype, device) and token count and writes `linear_configs/N=..,K=..,dtype=..,device=...json`,
a token count mapping to a tile or to {"cublas": true}. Shapes with no file (for the card or its tuned
sibling, moe.tile_configs.TUNED_SIBLING), and more than GEMV_MAX_TOKENS tokens, go to F.linear (the
reference).
"""

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from worker.kernels.moe.tile_configs import tuned_entry_for
from worker.kernels.pdl import pdl_enter, pdl_launch

GEMV_MAX_TOKENS = 8
GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_DIR = Path(__file__).parent / "linear_configs"


def _empty_output(shape, like: torch.Tensor) -> torch.Tensor:
    """The output the kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@triton.jit
def _gemv_kernel(x, w, bias, y, T, N, stride_xt, stride_wn, stride_yt,
                 K: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PDL: tl.constexpr):
    """y[t, n] = sum_k x[t, k] w[n, k] (+ bias[n]) for this program's BN rows n and every token t < T.
    Each step's weight tile is loaded one step ahead, the first before the PDL wait (weights do not
    depend on the kernel before)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < N
    t = tl.arange(0, TP)
    tmask = t < T
    kk = tl.arange(0, BK)
    w_rows = w + n.to(tl.int64)[:, None] * stride_wn
    x_rows = x + t.to(tl.int64)[:, None] * stride_xt
    wv = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
    pdl_enter(PDL)
    acc = tl.zeros([BN, TP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kk
        kmask = k < K
        xv = tl.load(x_rows + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv.to(tl.float32)[:, None, :] * xv[None, :, :], 2)
        wv = tl.load(w_rows + (k + BK)[None, :], mask=nmask[:, None] & (k + BK < K)[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    out = y + t.to(tl.int64)[None, :] * stride_yt + n[:, None]
    tl.store(out, acc.to(y.dtype.element_ty), mask=nmask[:, None] & tmask[None, :])


@triton.jit
def _one_token_rows(x_row, w, y_row, N, stride_wn, tile, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    PDL: tl.constexpr):
    """y_row[n] = sum_k x_row[k] w[n, k] for tile's BN rows n of one token: the GEMV's arithmetic, for a
    kernel that hands a few programs to a dense weight (fp8.triton's GEMV with dense rows)."""
    n = tile * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    w_rows = w + n.to(tl.int64)[:, None] * stride_wn
    wv = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
    pdl_enter(PDL)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kk
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.sum(wv.to(tl.float32) * xv[None, :], 1)
        wv = tl.load(w_rows + (k + BK)[None, :], mask=nmask[:, None] & (k + BK < K)[None, :], other=0.0)
    tl.store(y_row + n, acc.to(y_row.dtype.element_ty), mask=nmask)


def config_file_name(n: int, k: int, dtype: torch.dtype, device: str) -> str:
    return f"N={n},K={k},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.lru_cache(maxsize=4096)  # per layer per step: off the hot path
def get_tile(tokens: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The GEMV tile tuned for this shape at this token count (the nearest tuned one), None for F.linear."""
    tile = tuned_entry_for(device, lambda name: CONFIG_DIR / config_file_name(n, k, dtype, name), tokens)
    return None if tile is None or tile.get("cublas") else tile


def gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == weight.dtype and weight.dtype in GEMV_DTYPES and weight.dim() == 2
            and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: dict) -> torch.Tensor:
    """x [T, K] (T <= GEMV_MAX_TOKENS, unit stride along K), weight [N, K] -> [T, N] in x's dtype."""
    tokens, k = x.shape
    if tokens > GEMV_MAX_TOKENS:
        raise ValueError(f"the GEMV takes at most {GEMV_MAX_TOKENS} tokens, got {tokens}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n = weight.shape[0]
    y = _empty_output((tokens, n), x)
    if tokens == 0:
        return y
    bn = tile["BN"]
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, weight, bias if bias is not None else weight, y, tokens, n, x.stride(0), weight.stride(0), y.stride(0),
        K=k, TP=triton.next_power_of_2(tokens), BN=bn, BK=tile["BK"], HAS_BIAS=bias is not None,
        num_warps=tile.get("num_warps", 4), num_stages=tile.get("num_stages", 3), **pdl_launch(x.device))
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: dict | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias (the reference's signature; `tile` forces the GEMV with that tile)."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tile is None and tokens <= GEMV_MAX_TOKENS and gemv_fits(x, weight):
        tile = get_tile(tokens, weight.shape[0], weight.shape[1], weight.dtype, weight.device)
    if tile is None:
        return F.linear(x, weight, bias)
    return gemv(x.reshape(tokens, x.shape[-1]), weight, bias, tile).reshape(*x.shape[:-1], weight.shape[0])
