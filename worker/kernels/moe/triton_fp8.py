"""The fused MoE over block-scaled FP8 experts, Triton kernels (torch reference: fp8_reference.py).

The bf16 kernels' plan (worker/kernels/moe/triton.py) with e4m3 operands, in five launches and no
host sync:
1. the tokens quantised to e4m3 per group of b features (worker/kernels/fp8/triton.py);
2. align: the (token, slot) pairs grouped by expert into blocks of BLOCK_M (align.py);
3. gate_up: per (block, b columns of the gate and of the up projection), K walked one block at a
   time, each e4m3 product scaled by the token groups' and the weight blocks' scales; SwiGLU, then
   the tile's b columns quantised to e4m3 in the epilogue (a tile is exactly one group of the down
   GEMM's input), so the intermediate activations never exist in a wider type in memory;
4. down: the same over w2, scaled by each pair's routing weight -> y [T*S, H];
5. sum: over slots in slot order in fp32 (deterministic, no atomics), as the bf16 path.
Sums are float32 where the reference's are float64 (its docstring says why it sums so).
"""

import torch
import triton
import triton.language as tl

from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, kernel_block, scale_shape
from worker.kernels.fp8.triton import _round_to_e4m3, per_token_group_quant_fp8
from worker.kernels.moe.align import moe_align_block_size
from worker.kernels.moe.decode_fp8 import fused_moe_fp8_pairs
from worker.kernels.moe.tile_configs import get_config
from worker.kernels.moe import triton as bf16_kernels
from worker.kernels.moe.triton import _block_pairs, _check, _sum_slots_kernel, _tile, check_moe_shapes

DEFAULT_CONFIG = {"BLOCK_M": 16, "gate_up": dict(GROUP_M=1, num_warps=4, num_stages=3),
                  "down": dict(BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)}
DEFAULT_PAIRS_CONFIG = {"path": "pairs", "gate_up": dict(BLOCK_N=4, NB=4, num_warps=4),
                        "down": dict(BLOCK_N=4, num_warps=4)}
PAIRS_MAX_TOKENS = 2  # the decode path's default up to here


def get_fp8_config(num_tokens: int, num_experts: int, hidden: int, inter: int, device) -> dict:
    """A tuned config for this shape and device (tile_configs' JSON, dtype float8_e4m3fn), else a default:
    the decode path (decode_fp8.py) for a few tokens, the grouped kernels beyond."""
    tuned = get_config(num_tokens, num_experts, hidden, inter, FP8_DTYPE, device, fallback=False)
    if tuned is not None:
        return tuned
    return DEFAULT_PAIRS_CONFIG if num_tokens <= PAIRS_MAX_TOKENS else DEFAULT_CONFIG


@triton.jit
def _gate_up_fp8_kernel(x_q, x_s, w13, w13_s, inter_q, inter_s, sorted_ids, expert_ids, num_padded,
                        N, num_pairs, num_pid_m,
                        stride_x_t, stride_xs_t, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n,
                        stride_i_p, stride_is_p,
                        K: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr,
                        GROUP_M: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr):
    """inter[pair, n] = e4m3(silu(x . w13[e, n]) * (x . w13[e, N + n])) for one group of BLOCK columns."""
    pid_m, pid_n = _tile(num_padded, num_pid_m, N, BM, BLOCK, GROUP_M)
    if pid_m < 0:
        return
    expert, pair, rmask, n, nmask = _block_pairs(expert_ids, sorted_ids, pid_m, pid_n, num_pairs, N, BM, BLOCK)
    token = pair // S
    kk = tl.arange(0, BLOCK)
    a_rows = x_q + token[:, None] * stride_x_t
    g_cols = w13 + expert * stride_w_e + n[None, :].to(tl.int64) * stride_w_n
    u_cols = g_cols + N * stride_w_n
    sa_rows = x_s + token * stride_xs_t
    sg = w13_s + expert * stride_ws_e + pid_n * stride_ws_n  # the gate rows' block row (BLOCK rows = one block)
    su = sg + (N // BLOCK) * stride_ws_n
    acc_g = tl.zeros([BM, BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BM, BLOCK], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK)):
        k = kb * BLOCK + kk
        kmask = k < K
        a = tl.load(a_rows + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        u = tl.load(u_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        sa = tl.load(sa_rows + kb, mask=rmask, other=0.0)[:, None]
        acc_g += tl.dot(a, g) * sa * tl.load(sg + kb)
        acc_u += tl.dot(a, u) * sa * tl.load(su + kb)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    scale = tl.maximum(tl.max(tl.abs(h), axis=1), MIN_AMAX_) / FP8_MAX_  # [BM]: this tile is one group
    q = _round_to_e4m3(tl.clamp(tl.math.div_rn(h, scale[:, None]), -FP8_MAX_, FP8_MAX_))
    tl.store(inter_q + pair[:, None] * stride_i_p + n[None, :], q.to(inter_q.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])
    tl.store(inter_s + pair * stride_is_p + pid_n, scale, mask=rmask)


@triton.jit
def _down_fp8_kernel(inter_q, inter_s, w2, w2_s, y, topk_weights, sorted_ids, expert_ids, num_padded,
                     N, num_pairs, num_pid_m,
                     stride_i_p, stride_is_p, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, stride_y_p,
                     K: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """y[pair, n] = weight[pair] * (inter[pair] . w2[e, n]) for the block's pairs."""
    pid_m, pid_n = _tile(num_padded, num_pid_m, N, BM, BN, GROUP_M)
    if pid_m < 0:
        return
    expert, pair, rmask, n, nmask = _block_pairs(expert_ids, sorted_ids, pid_m, pid_n, num_pairs, N, BM, BN)
    kk = tl.arange(0, BLOCK)
    a_rows = inter_q + pair[:, None] * stride_i_p
    b_cols = w2 + expert * stride_w_e + n[None, :].to(tl.int64) * stride_w_n
    sa_rows = inter_s + pair * stride_is_p
    sb_cols = w2_s + expert * stride_ws_e + (n // BLOCK).to(tl.int64) * stride_ws_n
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(K // BLOCK):
        k = kb * BLOCK + kk
        a = tl.load(a_rows + k[None, :], mask=rmask[:, None], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=nmask[None, :], other=0.0)
        sa = tl.load(sa_rows + kb, mask=rmask, other=0.0)
        sb = tl.load(sb_cols + kb, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    acc = acc * tl.load(topk_weights + pair, mask=rmask, other=0.0)[:, None]
    tl.store(y + pair[:, None] * stride_y_p + n[None, :], acc.to(y.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def fused_moe_fp8(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] float8_e4m3fn, gate rows then up rows
    w2: torch.Tensor,  # [E, H, I] float8_e4m3fn
    w13_scale_inv: torch.Tensor,  # [E, 2I/b, ceil(H/b)] float32
    w2_scale_inv: torch.Tensor,  # [E, ceil(H/b), I/b] float32
    topk_weights: torch.Tensor,  # [T, S] fp32
    topk_ids: torch.Tensor,  # [T, S]
    block: int,
    config: dict | None = None,  # {"BLOCK_M", "gate_up": {...}, "down": {"BLOCK_N", ...}} or the decode path's
    # {"path": "pairs", "gate_up": {"BLOCK_N", "NB", ...}, "down": {"BLOCK_N", ...}}; None: get_fp8_config
    x_groups: tuple[torch.Tensor, torch.Tensor] | None = None,  # per_token_group_quant_fp8(hidden_states, block)
) -> torch.Tensor:  # [T, H]
    T, H, E, I = check_moe_shapes(hidden_states, w13, w2, topk_weights, topk_ids)
    _check(w13.dtype == w2.dtype == FP8_DTYPE, f"w13 and w2 must be {FP8_DTYPE}, got {w13.dtype}, {w2.dtype}")
    _check(kernel_block(block), f"the FP8 kernels need a power-of-two block of at least 16, got {block}")
    _check(I % block == 0, f"w2 has {I} intermediate columns, not a multiple of the block {block}")
    for name, weight, scale in (("w13", w13, w13_scale_inv), ("w2", w2, w2_scale_inv)):
        expected = scale_shape(tuple(weight.shape), block)
        _check(tuple(scale.shape) == expected,
               f"{name}_scale_inv must be [{', '.join(map(str, expected))}], got {tuple(scale.shape)}")
    _check(w13.stride(2) == 1 and w2.stride(2) == 1, "w13 and w2 must be contiguous in their last dim")
    S = topk_ids.shape[1]
    out = bf16_kernels._empty_output(hidden_states)
    if T == 0:
        return out
    cfg = config or get_fp8_config(T, E, H, I, hidden_states.device)
    w13_s, w2_s = w13_scale_inv.float().contiguous(), w2_scale_inv.float().contiguous()
    weights = topk_weights.float().contiguous().view(-1)
    if cfg.get("path") == "pairs":
        x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
        inter = bf16_kernels._empty_output(x, (T * S, I), torch.float32)
        fused_moe_fp8_pairs(x, w13, w2, w13_s, w2_s, weights, topk_ids.contiguous(), out, inter, block, cfg,
                            x_groups)
        return out
    x_q, x_s = x_groups or per_token_group_quant_fp8(hidden_states, block)
    num_pairs, BM = T * S, cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, E, BM)
    num_blocks = expert_ids.shape[0]
    inter_q = torch.empty(num_pairs, I, dtype=FP8_DTYPE, device=x_q.device)
    inter_s = bf16_kernels._empty_output(x_s, (num_pairs, I // block))
    y = bf16_kernels._empty_output(hidden_states, (num_pairs, H))
    up, down = cfg["gate_up"], cfg["down"]
    _gate_up_fp8_kernel[(num_blocks * (I // block),)](
        x_q, x_s, w13, w13_s, inter_q, inter_s, sorted_ids, expert_ids, num_padded, I, num_pairs, num_blocks,
        x_q.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), w13_s.stride(0), w13_s.stride(1),
        inter_q.stride(0), inter_s.stride(0),
        K=H, S=S, BLOCK=block, BM=BM, GROUP_M=up["GROUP_M"], FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX,
        num_warps=up["num_warps"], num_stages=up["num_stages"])
    BN = down["BLOCK_N"]
    _down_fp8_kernel[(num_blocks * triton.cdiv(H, BN),)](
        inter_q, inter_s, w2, w2_s, y, weights, sorted_ids, expert_ids, num_padded, H, num_pairs, num_blocks,
        inter_q.stride(0), inter_s.stride(0), w2.stride(0), w2.stride(1), w2_s.stride(0), w2_s.stride(1), y.stride(0),
        K=I, BLOCK=block, BM=BM, BN=BN, GROUP_M=down["GROUP_M"],
        num_warps=down["num_warps"], num_stages=down["num_stages"])
    BH = min(1024, triton.next_power_of_2(H))
    _sum_slots_kernel[(T, triton.cdiv(H, BH))](y, out, H, y.stride(0), out.stride(0), S=S, BH=BH, num_warps=4)
    return out
