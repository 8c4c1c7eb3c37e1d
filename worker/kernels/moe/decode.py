"""The fused MoE for decode-sized batches: GEMVs per (token, slot) pair, no grouping by expert.

With a handful of tokens nearly every (token, slot) pair has an expert of its own, so grouping
them buys nothing and its launches cost more than the weights take to read. Two stages:
1. gate_up: one program per (pair, BN columns) reads its expert's gate and up rows once,
   SwiGLU in the epilogue -> inter [T*S, I];
2. down: one program per (token, BN columns) loads the BN rows of all S slots' experts at once
   ([S, BN, BK] tiles, no chain of loads slot after slot), scales each slot's product by its
   routing weight and sums the slots into out [T, H] directly: deterministic, no y buffer.
The down stage's weights do not depend on gate_up, so its programs load their first tiles before
they wait for the intermediate activations. Run as either
- two launches, the second a programmatic dependent launch on Hopper and later (griddepcontrol):
  it starts while gate_up's last programs run; or
- one launch (`"fused": True`): the down programs come after all gate_up programs in the grid,
  so the hardware has dispatched every gate_up program before the first down program, which then
  spins until its token's gate_up tiles are counted done. The last down program of a token
  zeroes the counters for the next call, so the launch needs no memset before it.
Products are in fp32 (elementwise, reduced along K in registers); tiles from tile_configs
(`"path": "pairs"`).
"""


import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from worker.kernels.pdl import pdl_enter, use_pdl

MAX_FUSED_TOKENS = 64  # counters per token of the one-launch form


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _token_counters(device: torch.device) -> torch.Tensor:
    """[2, MAX_FUSED_TOKENS] int32, zero between launches (each launch leaves them zero): gate_up tiles
    done per token, and down programs past their wait per token."""
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fused MoE's counters are made on first use: run it once before graph capture")
        _COUNTERS[device] = torch.zeros(2, MAX_FUSED_TOKENS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


@triton.jit
def _gate_up_step(x_ptr, g_ptr, u_ptr, nmask, k_left, acc_g, acc_u, BK: tl.constexpr):
    kmask = tl.arange(0, BK) < k_left
    xk = tl.load(x_ptr, mask=kmask, other=0.0).to(tl.float32)[None, :]
    wmask = nmask[:, None] & kmask[None, :]
    acc_g += tl.load(g_ptr, mask=wmask, other=0.0).to(tl.float32) * xk
    acc_u += tl.load(u_ptr, mask=wmask, other=0.0).to(tl.float32) * xk
    return acc_g, acc_u


@triton.jit
def _gate_up_rows_step(x_ptr, g_ptr, u_ptr, nmask, k_left, acc_g, acc_u, BK: tl.constexpr):
    """As _gate_up_step, reduced along K at once: [BN] accumulators, fewer registers held."""
    kmask = tl.arange(0, BK) < k_left
    xk = tl.load(x_ptr, mask=kmask, other=0.0).to(tl.float32)[None, :]
    wmask = nmask[:, None] & kmask[None, :]
    acc_g += tl.sum(tl.load(g_ptr, mask=wmask, other=0.0).to(tl.float32) * xk, 1)
    acc_u += tl.sum(tl.load(u_ptr, mask=wmask, other=0.0).to(tl.float32) * xk, 1)
    return acc_g, acc_u


@triton.jit
def _gate_up_tile(x, w13, inter, topk_ids, pair, n_tile, N, K, stride_x_t, stride_w_e, stride_w_n, stride_i_p,
                  S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
                  ROW_ACC: tl.constexpr):
    """inter[pair, tile] = silu(x . gate rows) * (x . up rows) of the pair's expert; ROW_ACC: reduce along
    K every step (a tile config choice: fewer registers against more reductions)."""
    n = n_tile * BN + tl.arange(0, BN)
    nmask = n < N
    expert = tl.load(topk_ids + pair).to(tl.int64)
    kk = tl.arange(0, BK)
    x_ptr = x + (pair // S) * stride_x_t + kk
    g_ptr = w13 + expert * stride_w_e + n[:, None].to(tl.int64) * stride_w_n + kk[None, :]
    u_ptr = g_ptr + N * stride_w_n
    if ROW_ACC:
        g = tl.zeros([BN], dtype=tl.float32)
        u = tl.zeros([BN], dtype=tl.float32)
        if INTERPRET:  # its range() takes no tensor bounds
            k0 = 0
            while k0 < K:
                g, u = _gate_up_rows_step(x_ptr + k0, g_ptr + k0, u_ptr + k0, nmask, K - k0, g, u, BK)
                k0 += BK
        else:
            for k0 in range(0, K, BK):
                g, u = _gate_up_rows_step(x_ptr + k0, g_ptr + k0, u_ptr + k0, nmask, K - k0, g, u, BK)
    else:
        acc_g = tl.zeros([BN, BK], dtype=tl.float32)
        acc_u = tl.zeros([BN, BK], dtype=tl.float32)
        if INTERPRET:
            k0 = 0
            while k0 < K:
                acc_g, acc_u = _gate_up_step(x_ptr + k0, g_ptr + k0, u_ptr + k0, nmask, K - k0, acc_g, acc_u, BK)
                k0 += BK
        else:
            for k0 in range(0, K, BK):
                acc_g, acc_u = _gate_up_step(x_ptr + k0, g_ptr + k0, u_ptr + k0, nmask, K - k0, acc_g, acc_u, BK)
        g = tl.sum(acc_g, 1)
        u = tl.sum(acc_u, 1)
    tl.store(inter + pair * stride_i_p + n, (g * tl.sigmoid(g) * u).to(inter.dtype.element_ty), mask=nmask)


@triton.jit
def _down_weights(w_ptr, smask, nmask, k_left, BK: tl.constexpr):
    """[BS, BN, BK] rows of the slots' experts at one K offset (zeros past K and past S)."""
    kmask = tl.arange(0, BK) < k_left
    return tl.load(w_ptr, mask=smask[:, None, None] & nmask[None, :, None] & kmask[None, None, :], other=0.0)


@triton.jit
def _down_first_weights(w2, topk_ids, t, n_tile, N, K, stride_w_e, stride_w_n,
                        S: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """-> (the token's slot rows at K offset 0, their pointers): what a down tile can load before
    gate_up has finished (topk_ids was written before gate_up ran)."""
    n = n_tile * BN + tl.arange(0, BN)
    s = tl.arange(0, BS)
    expert = tl.load(topk_ids + t * S + s, mask=s < S, other=0).to(tl.int64)
    w_ptr = (w2 + expert[:, None, None] * stride_w_e + n[None, :, None].to(tl.int64) * stride_w_n
             + tl.arange(0, BK)[None, None, :])
    return _down_weights(w_ptr, s < S, n < N, K, BK), w_ptr


@triton.jit
def _down_tile(inter, out, topk_weights, w, w_ptr, t, n_tile, N, K, stride_i_p, stride_o_t,
               S: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[t, tile] = sum over slots (in one fixed order) of weight * (inter[pair] . w2 rows)."""
    n = n_tile * BN + tl.arange(0, BN)
    nmask = n < N
    s = tl.arange(0, BS)
    smask = s < S
    pair = t * S + s
    kk = tl.arange(0, BK)
    a_ptr = inter + pair[:, None] * stride_i_p + kk[None, :]
    acc = tl.zeros([BS, BN], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        kmask = kk < K - k0
        # .cg: past L1, which is not coherent with what other programs of a fused launch wrote
        a = tl.load(a_ptr + k0, mask=smask[:, None] & kmask[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], 2)
        k0 += BK
        if k0 < K:
            w = _down_weights(w_ptr + k0, smask, nmask, K - k0, BK)
    slot_out = acc * tl.load(topk_weights + pair, mask=smask, other=0.0)[:, None]  # [BS, BN]
    tl.store(out + t * stride_o_t + n, tl.sum(slot_out, 0).to(out.dtype.element_ty), mask=nmask)


@triton.jit
def _gate_up_pairs_kernel(x, w13, inter, topk_ids, N, K, stride_x_t, stride_w_e, stride_w_n, stride_i_p,
                          S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
                          PDL: tl.constexpr, DOWN_PDL: tl.constexpr, ROW_ACC: tl.constexpr = False):
    if PDL:
        gdc_wait()  # only: its dependent (down) is let in at its end, when DOWN_PDL
    _gate_up_tile(x, w13, inter, topk_ids, tl.program_id(0).to(tl.int64), tl.program_id(1), N, K,
                  stride_x_t, stride_w_e, stride_w_n, stride_i_p, S, BN, BK, INTERPRET, ROW_ACC)
    if DOWN_PDL:
        gdc_launch_dependents()


@triton.jit
def _down_tokens_kernel(inter, w2, out, topk_weights, topk_ids, N, K, stride_i_p, stride_w_e, stride_w_n, stride_o_t,
                        S: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        INTERPRET: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    w, w_ptr = _down_first_weights(w2, topk_ids, t, tl.program_id(1), N, K, stride_w_e, stride_w_n, S, BS, BN, BK)
    pdl_enter(PDL)  # gate_up's inter is complete and visible from here on
    _down_tile(inter, out, topk_weights, w, w_ptr, t, tl.program_id(1), N, K, stride_i_p, stride_o_t, S, BS, BN, BK)


@triton.jit
def _fused_pairs_kernel(x, w13, w2, inter, out, topk_weights, topk_ids, counters, T, H, I,
                        stride_x_t, stride_w13_e, stride_w13_n, stride_w2_e, stride_w2_n, stride_i_p, stride_o_t,
                        S: tl.constexpr, BS: tl.constexpr, UP_BN: tl.constexpr, UP_BK: tl.constexpr,
                        DOWN_BN: tl.constexpr, DOWN_BK: tl.constexpr, MAX_T: tl.constexpr,
                        INTERPRET: tl.constexpr, ROW_ACC: tl.constexpr):
    """Programs [0, T*S*up_tiles) are gate_up tiles, the rest down tiles (see the module docstring)."""
    pid = tl.program_id(0)
    up_tiles = tl.cdiv(I, UP_BN)
    num_up = T * S * up_tiles
    ready, passed = counters, counters + MAX_T
    if pid < num_up:
        pair = (pid // up_tiles).to(tl.int64)
        _gate_up_tile(x, w13, inter, topk_ids, pair, pid % up_tiles, I, H, stride_x_t, stride_w13_e, stride_w13_n,
                      stride_i_p, S, UP_BN, UP_BK, INTERPRET, ROW_ACC)
        tl.debug_barrier()  # every thread's stores before the count that publishes them
        tl.atomic_add(ready + pair // S, 1, sem="release")
    else:
        down_tiles = tl.cdiv(H, DOWN_BN)
        t = ((pid - num_up) // down_tiles).to(tl.int64)
        n_tile = (pid - num_up) % down_tiles
        w, w_ptr = _down_first_weights(w2, topk_ids, t, n_tile, H, I, stride_w2_e, stride_w2_n, S, BS, DOWN_BN,
                                       DOWN_BK)
        done = tl.atomic_add(ready + t, 0, sem="acquire")
        while done < S * up_tiles:
            done = tl.atomic_add(ready + t, 0, sem="acquire")
        tl.debug_barrier()
        _down_tile(inter, out, topk_weights, w, w_ptr, t, n_tile, H, I, stride_i_p, stride_o_t, S, BS, DOWN_BN,
                   DOWN_BK)
        if tl.atomic_add(passed + t, 1, sem="acq_rel") == down_tiles - 1:  # the token's last: reset for next time
            tl.atomic_xchg(ready + t, 0)
            tl.atomic_xchg(passed + t, 0)


def fused_moe_pairs(x, w13, w2, weights, topk_ids, out, inter, cfg: dict, interpret: bool) -> None:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T*S] fp32, topk_ids [T, S] -> out [T, H]."""
    T, H = x.shape
    S, I = topk_ids.shape[1], w2.shape[2]
    up, down = cfg["gate_up"], cfg["down"]
    BS = triton.next_power_of_2(S)
    if cfg.get("fused") and T <= MAX_FUSED_TOKENS:
        grid = (T * S * triton.cdiv(I, up["BLOCK_N"]) + T * triton.cdiv(H, down["BLOCK_N"]),)
        _fused_pairs_kernel[grid](
            x, w13, w2, inter, out, weights, topk_ids, _token_counters(x.device), T, H, I,
            x.stride(0), w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1), inter.stride(0), out.stride(0),
            S=S, BS=BS, UP_BN=up["BLOCK_N"], UP_BK=up["BLOCK_K"], DOWN_BN=down["BLOCK_N"], DOWN_BK=down["BLOCK_K"],
            MAX_T=MAX_FUSED_TOKENS, INTERPRET=interpret, ROW_ACC=up.get("row_acc", False),
            num_warps=cfg.get("num_warps", up["num_warps"]))
        return
    pdl = use_pdl(x.device)
    down_pdl = cfg.get("pdl", True) and pdl
    _gate_up_pairs_kernel[(T * S, triton.cdiv(I, up["BLOCK_N"]))](
        x, w13, inter, topk_ids, I, H, x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        S=S, BN=up["BLOCK_N"], BK=up["BLOCK_K"], INTERPRET=interpret, PDL=pdl, DOWN_PDL=down_pdl,
        ROW_ACC=up.get("row_acc", False), num_warps=up["num_warps"], launch_pdl=pdl)
    _down_tokens_kernel[(T, triton.cdiv(H, down["BLOCK_N"]))](
        inter, w2, out, weights, topk_ids, H, I, inter.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        S=S, BS=BS, BN=down["BLOCK_N"], BK=down["BLOCK_K"], INTERPRET=interpret, PDL=down_pdl,
        num_warps=down["num_warps"], launch_pdl=down_pdl)
