"""Sparse mixture of SwiGLU experts, Triton kernels (torch references: worker.kernels.moe.reference).

select_experts: one program per token: fp32 softmax, top-k by repeated arg-max (ties to the lower
id), renormalisation, and the shared expert's sigmoid gate as slot top_k.

fused_moe for decode-sized batches (tile config `"path": "pairs"`): two GEMV launches, decode.py.
Otherwise in four launches and no host sync:
1. align: the T*S (token, slot) pairs grouped by expert into blocks of BLOCK_M (align.py);
2. gate_up: a grouped GEMM over those blocks, each program one (block, BLOCK_N columns) tile of the
   gate and of the up projection, SwiGLU in the epilogue -> inter [T*S, I];
3. down: the same over w2, scaled by each pair's routing weight -> y [T*S, H];
4. sum: out[t] = sum over slots s of y[t*S + s], in slot order in fp32 (deterministic, no atomics).
Blocks past the used length exit at once. With a handful of tokens each selected expert has one
block, so its weights are read once per column tile: the small-batch path is memory-bound by
construction; tiles come from tile_configs (tuned JSON per device, else a default).
"""

import torch
import triton
import triton.language as tl

from worker.kernels.moe.align import moe_align_block_size
from worker.kernels.moe.decode import fused_moe_pairs
from worker.kernels.moe.tile_configs import get_config
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule_chunked import _interpreting
from worker.kernels.triton_gated_delta_rule_wy import _dot_precision


SELECT_EXPERTS_WARPS = 1  # one program per token; 4.0 us a call against 4.7 with 4 warps (H200, 513 experts)


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _select_experts_kernel(logits, weights, ids, stride_l, E, TOP_K: tl.constexpr, S: tl.constexpr,
                           BE: tl.constexpr, BS: tl.constexpr, RENORMALIZE: tl.constexpr, SHARED: tl.constexpr,
                           PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    x = tl.load(logits + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(e < E, p, -1.0)
    slot = tl.arange(0, BS)
    w = tl.zeros([BS], dtype=tl.float32)
    chosen = tl.zeros([BS], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, BE), 0)
        w = tl.where(slot == j, best, w)
        chosen = tl.where(slot == j, idx, chosen)
        p = tl.where(e == idx, -1.0, p)
    if RENORMALIZE:
        w = w / tl.sum(w, 0)
    if SHARED:
        gate = tl.load(logits + t * stride_l + E).to(tl.float32)
        w = tl.where(slot == TOP_K, tl.sigmoid(gate), w)
        chosen = tl.where(slot == TOP_K, E, chosen)
    tl.store(weights + t * S + slot, w, mask=slot < S)
    tl.store(ids + t * S + slot, chosen, mask=slot < S)


@triton.jit
def _tile(num_padded, num_pid_m, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program -> (block, column tile) in groups of GROUP_M blocks, so neighbours share weight tiles
    in L2; pid_m is -1 for a block past the used length."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    pid_m = tl.where(pid_m * BM < tl.load(num_padded), pid_m, -1)
    return pid_m, pid_n


@triton.jit
def _block_pairs(expert_ids, sorted_ids, pid_m, pid_n, num_pairs, N, BM: tl.constexpr, BN: tl.constexpr):
    """-> (the block's expert, its pairs (int64), which are real, the tile's columns, which are in range)."""
    expert = tl.load(expert_ids + pid_m).to(tl.int64)
    pair = tl.load(sorted_ids + pid_m * BM + tl.arange(0, BM))
    n = pid_n * BN + tl.arange(0, BN)
    return expert, pair.to(tl.int64), pair < num_pairs, n, n < N


@triton.jit
def _gate_up_step(a_ptr, g_ptr, u_ptr, rmask, nmask, k_left, acc_g, acc_u, BK: tl.constexpr, DOT: tl.constexpr):
    kk = tl.arange(0, BK)
    kmask = kk < k_left
    a = tl.load(a_ptr, mask=rmask[:, None] & kmask[None, :], other=0.0)
    g = tl.load(g_ptr, mask=kmask[:, None] & nmask[None, :], other=0.0)
    u = tl.load(u_ptr, mask=kmask[:, None] & nmask[None, :], other=0.0)
    acc_g = tl.dot(a, g, acc_g, input_precision=DOT)
    acc_u = tl.dot(a, u, acc_u, input_precision=DOT)
    return acc_g, acc_u


@triton.jit
def _gate_up_kernel(x, w13, inter, sorted_ids, expert_ids, num_padded,
                    N, K, num_pairs, num_pid_m,
                    stride_x_t, stride_w_e, stride_w_n, stride_i_p,
                    S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """inter[pair, n] = silu(x[token] . w13[e, n]) * (x[token] . w13[e, N + n]) for the block's pairs."""
    pid_m, pid_n = _tile(num_padded, num_pid_m, N, BM, BN, GROUP_M)
    if pid_m < 0:
        return
    expert, pair, rmask, n, nmask = _block_pairs(expert_ids, sorted_ids, pid_m, pid_n, num_pairs, N, BM, BN)
    token = pair // S
    kk = tl.arange(0, BK)
    a_ptr = x + token[:, None] * stride_x_t + kk[None, :]
    g_ptr = w13 + expert * stride_w_e + n[None, :].to(tl.int64) * stride_w_n + kk[:, None]
    u_ptr = g_ptr + N * stride_w_n
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    if INTERPRET:
        k0 = 0
        while k0 < K:
            acc_g, acc_u = _gate_up_step(a_ptr + k0, g_ptr + k0, u_ptr + k0, rmask, nmask, K - k0, acc_g, acc_u,
                                         BK, DOT)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            acc_g, acc_u = _gate_up_step(a_ptr + k0, g_ptr + k0, u_ptr + k0, rmask, nmask, K - k0, acc_g, acc_u,
                                         BK, DOT)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out = inter + pair[:, None] * stride_i_p + n[None, :]
    tl.store(out, h.to(inter.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_step(a_ptr, b_ptr, rmask, nmask, k_left, acc, BK: tl.constexpr, DOT: tl.constexpr):
    kk = tl.arange(0, BK)
    kmask = kk < k_left
    a = tl.load(a_ptr, mask=rmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(b_ptr, mask=kmask[:, None] & nmask[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=DOT)


@triton.jit
def _down_kernel(inter, w2, y, topk_weights, sorted_ids, expert_ids, num_padded,
                 N, K, num_pairs, num_pid_m,
                 stride_i_p, stride_w_e, stride_w_n, stride_y_p,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """y[pair, n] = weight[pair] * (inter[pair] . w2[e, n]) for the block's pairs."""
    pid_m, pid_n = _tile(num_padded, num_pid_m, N, BM, BN, GROUP_M)
    if pid_m < 0:
        return
    expert, pair, rmask, n, nmask = _block_pairs(expert_ids, sorted_ids, pid_m, pid_n, num_pairs, N, BM, BN)
    kk = tl.arange(0, BK)
    a_ptr = inter + pair[:, None] * stride_i_p + kk[None, :]
    b_ptr = w2 + expert * stride_w_e + n[None, :].to(tl.int64) * stride_w_n + kk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if INTERPRET:
        k0 = 0
        while k0 < K:
            acc = _down_step(a_ptr + k0, b_ptr + k0, rmask, nmask, K - k0, acc, BK, DOT)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            acc = _down_step(a_ptr + k0, b_ptr + k0, rmask, nmask, K - k0, acc, BK, DOT)
    acc = acc * tl.load(topk_weights + pair, mask=rmask, other=0.0)[:, None]
    tl.store(y + pair[:, None] * stride_y_p + n[None, :], acc.to(y.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _sum_slots_kernel(y, out, H, stride_y_p, stride_o_t, S: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = h < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(y + (t * S + s) * stride_y_p + h, mask=hmask, other=0.0).to(tl.float32)
    tl.store(out + t * stride_o_t + h, acc.to(out.dtype.element_ty), mask=hmask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def select_experts(
    router_logits: torch.Tensor,  # [T, E] or, with shared_gate, [T, E + 1] (last column: the shared gate)
    top_k: int,
    renormalize: bool,
    shared_gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, S] fp32, ids [T, S] int32), S = top_k + shared_gate
    _check(router_logits.dim() == 2, f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    T, columns = router_logits.shape
    E = columns - int(shared_gate)
    _check(0 < top_k <= E, f"top_k must be in 1..{E}, got {top_k}")
    S = top_k + int(shared_gate)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = _empty_output(logits, (T, S), torch.float32)
    ids = torch.empty(T, S, dtype=torch.int32, device=logits.device)
    if T:
        _select_experts_kernel[(T,)](logits, weights, ids, logits.stride(0), E, TOP_K=top_k, S=S,
                                     BE=triton.next_power_of_2(E), BS=triton.next_power_of_2(S),
                                     RENORMALIZE=renormalize, SHARED=shared_gate, num_warps=SELECT_EXPERTS_WARPS,
                                     **pdl_launch(logits.device))
    return weights, ids


def check_moe_shapes(hidden_states, w13, w2, topk_weights, topk_ids) -> tuple[int, int, int, int]:
    """-> (T, H, E, I) of a fused MoE call, after checking that its tensors agree."""
    _check(hidden_states.dim() == 2, f"hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
    T, H = hidden_states.shape
    _check(w13.dim() == 3 and w13.shape[2] == H and w13.shape[1] % 2 == 0,
           f"w13 must be [E, 2I, {H}], got {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    _check(tuple(w2.shape) == (E, H, I), f"w2 must be [{E}, {H}, {I}], got {tuple(w2.shape)}")
    _check(topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_weights.shape == topk_ids.shape,
           f"topk_weights and topk_ids must be [{T}, S], got {tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}")
    return T, H, E, I


def _launch_grid(num_blocks: int, N: int, BN: int) -> tuple[int]:
    return (num_blocks * triton.cdiv(N, BN),)


def _gemm_args(cfg: dict) -> dict:
    return dict(BN=cfg["BLOCK_N"], BK=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def fused_moe(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H], gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, S] fp32
    topk_ids: torch.Tensor,  # [T, S]
    config: dict | None = None,  # tile config (tile_configs' format); None: looked up
) -> torch.Tensor:  # [T, H]
    T, H, E, I = check_moe_shapes(hidden_states, w13, w2, topk_weights, topk_ids)
    _check(w13.dtype == w2.dtype == hidden_states.dtype,
           f"hidden_states, w13 and w2 must share a dtype, got {hidden_states.dtype}, {w13.dtype}, {w2.dtype}")
    _check(w13.stride(2) == 1 and w2.stride(2) == 1, "w13 and w2 must be contiguous in their last dim")
    S = topk_ids.shape[1]
    out = _empty_output(hidden_states)
    if T == 0:
        return out
    x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
    weights = topk_weights.float().contiguous().view(-1)
    cfg = config or get_config(T, E, H, I, x.dtype, x.device)
    num_pairs = T * S
    if cfg.get("path") == "pairs":
        inter = _empty_output(x, (num_pairs, I))
        fused_moe_pairs(x, w13, w2, weights, topk_ids.contiguous(), out, inter, cfg, _interpreting())
        return out
    BM = cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, E, BM)
    num_blocks = expert_ids.shape[0]
    inter = _empty_output(x, (num_pairs, I))
    y = _empty_output(x, (num_pairs, H))
    dot, interpret = _dot_precision(x.dtype), _interpreting()
    up, down = _gemm_args(cfg["gate_up"]), _gemm_args(cfg["down"])
    _gate_up_kernel[_launch_grid(num_blocks, I, up["BN"])](
        x, w13, inter, sorted_ids, expert_ids, num_padded, I, H, num_pairs, num_blocks,
        x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        S=S, BM=BM, DOT=dot, INTERPRET=interpret, **up)
    _down_kernel[_launch_grid(num_blocks, H, down["BN"])](
        inter, w2, y, weights, sorted_ids, expert_ids, num_padded, H, I, num_pairs, num_blocks,
        inter.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BM=BM, DOT=dot, INTERPRET=interpret, **down)
    BH = min(1024, triton.next_power_of_2(H))
    _sum_slots_kernel[(T, triton.cdiv(H, BH))](y, out, H, y.stride(0), out.stride(0), S=S, BH=BH, num_warps=4)
    return out
