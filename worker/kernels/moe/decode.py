"""The fused MoE for decode-sized batches: two GEMV launches, no grouping by expert.

With a handful of tokens nearly every (token, slot) pair has an expert of its own, so grouping
them buys nothing and its launches cost more than the weights take to read. Here:
1. gate_up: one program per (pair, BN columns) reads its expert's gate and up rows once,
   SwiGLU in the epilogue -> inter [T*S, I];
2. down: one program per (token, BN columns) walks the token's S slots in slot order, each slot's
   expert rows scaled by its routing weight, and writes out [T, H] directly: the sum over slots is
   deterministic and needs no y buffer nor a third launch.
Products are in fp32 (elementwise, reduced along K in registers); tiles from tile_configs
(`"path": "pairs"`).
"""

import triton
import triton.language as tl


@triton.jit
def _gate_up_pairs_kernel(x, w13, inter, topk_ids, N, K, stride_x_t, stride_w_e, stride_w_n, stride_i_p,
                          S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    expert = tl.load(topk_ids + pair).to(tl.int64)
    kk = tl.arange(0, BK)
    x_ptr = x + (pair // S) * stride_x_t + kk
    g_ptr = w13 + expert * stride_w_e + n[:, None].to(tl.int64) * stride_w_n + kk[None, :]
    u_ptr = g_ptr + N * stride_w_n
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
def _gate_up_step(x_ptr, g_ptr, u_ptr, nmask, k_left, acc_g, acc_u, BK: tl.constexpr):
    kmask = tl.arange(0, BK) < k_left
    xk = tl.load(x_ptr, mask=kmask, other=0.0).to(tl.float32)[None, :]
    wmask = nmask[:, None] & kmask[None, :]
    acc_g += tl.load(g_ptr, mask=wmask, other=0.0).to(tl.float32) * xk
    acc_u += tl.load(u_ptr, mask=wmask, other=0.0).to(tl.float32) * xk
    return acc_g, acc_u


@triton.jit
def _down_step(a_ptr, b_ptr, nmask, k_left, acc, BK: tl.constexpr):
    kmask = tl.arange(0, BK) < k_left
    a = tl.load(a_ptr, mask=kmask, other=0.0).to(tl.float32)[None, :]
    return acc + tl.load(b_ptr, mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32) * a


@triton.jit
def _down_tokens_kernel(inter, w2, out, topk_weights, topk_ids, N, K, stride_i_p, stride_w_e, stride_w_n, stride_o_t,
                        S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    kk = tl.arange(0, BK)
    total = tl.zeros([BN], dtype=tl.float32)
    for s in tl.static_range(S):
        pair = t * S + s
        expert = tl.load(topk_ids + pair).to(tl.int64)
        a_ptr = inter + pair * stride_i_p + kk
        b_ptr = w2 + expert * stride_w_e + n[:, None].to(tl.int64) * stride_w_n + kk[None, :]
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        if INTERPRET:
            k0 = 0
            while k0 < K:
                acc = _down_step(a_ptr + k0, b_ptr + k0, nmask, K - k0, acc, BK)
                k0 += BK
        else:
            for k0 in range(0, K, BK):
                acc = _down_step(a_ptr + k0, b_ptr + k0, nmask, K - k0, acc, BK)
        total += tl.load(topk_weights + pair) * tl.sum(acc, 1)
    tl.store(out + t * stride_o_t + n, total.to(out.dtype.element_ty), mask=nmask)


def fused_moe_pairs(x, w13, w2, weights, topk_ids, out, inter, cfg: dict, interpret: bool) -> None:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T*S] fp32, topk_ids [T, S] -> out [T, H]."""
    T, H = x.shape
    S, I = topk_ids.shape[1], w2.shape[2]
    up, down = cfg["gate_up"], cfg["down"]
    _gate_up_pairs_kernel[(T * S, triton.cdiv(I, up["BLOCK_N"]))](
        x, w13, inter, topk_ids, I, H, x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        S=S, BN=up["BLOCK_N"], BK=up["BLOCK_K"], INTERPRET=interpret, num_warps=up["num_warps"])
    _down_tokens_kernel[(T, triton.cdiv(H, down["BLOCK_N"]))](
        inter, w2, out, weights, topk_ids, H, I, inter.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        S=S, BN=down["BLOCK_N"], BK=down["BLOCK_K"], INTERPRET=interpret, num_warps=down["num_warps"])
