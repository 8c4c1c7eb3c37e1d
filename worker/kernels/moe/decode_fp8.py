"""The FP8 fused MoE for decode-sized batches: the bf16 decode path's plan (decode.py) over
block-scaled e4m3 experts, in two launches.

1. gate_up: one program per (pair, BN columns, BN dividing the block b) walks K NB blocks at a
   time. It quantises its token's features to e4m3 per group of b itself (the same rounding as
   per_token_group_quant_fp8; the vector is short, so no launch of its own), or with `"prequant"`
   in the config reads them from one per_token_group_quant_fp8 launch before it (every program of
   a narrow tile repeats the quantisation otherwise, on the path to its first product), multiplies them
   with the expert's e4m3 rows, sums each block in fp32 and scales it by the group's and the
   weight block's scales. SwiGLU -> inter [T*S, I] in fp32, unrounded;
2. down: one program per (token, BN rows, NB blocks of K at a time: all of them with NB = I / b, so
   that every weight it reads is loaded before it waits) quantises each slot's intermediate row per group of b
   (what the grouped kernel's gate_up epilogue does; with `"prequant"` in its config one
   per_token_group_quant_fp8 launch does it once for all programs), multiplies with the [S, BN, b] e4m3 rows of
   all slots' experts at once, scales, weighs by the routing weights and sums the slots in one
   fixed order into out [T, H]. On Hopper and later it is a programmatic dependent launch that
   loads its first weights before it waits for gate_up. With `"packed"` (and "prequant") in its config,
   _down_fp8_packed_kernel instead: the same sums slot by slot, from weights held as 32-bit words.
Equal to the grouped FP8 kernels (triton_fp8.py) up to fp32 summation order.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from worker.kernels.fp8.quant import FP8_MAX, MIN_AMAX
from worker.kernels.fp8.triton import _quantize_groups, gemv_features, per_token_group_quant_fp8
from worker.kernels.pdl import pdl_enter, use_pdl


@triton.jit
def _gate_up_fp8_pairs_kernel(x, x_q, x_s, w13, w13_s, inter, topk_ids, N, stride_x_t, stride_xq_t, stride_xs_t,
                              stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, stride_i_p,
                              K: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                              BN: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr,
                              PREQUANT: tl.constexpr, PDL: tl.constexpr, DOWN_PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # only: its dependent (down) is let in at its end, when DOWN_PDL
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    expert = tl.load(topk_ids + pair).to(tl.int64)
    nb = tl.arange(0, NB)
    kk = tl.arange(0, BLOCK)
    k2 = nb[:, None] * BLOCK + kk[None, :]  # [NB, BLOCK]: NB groups of the features, loaded as such (no reshape)
    g_rows = w13 + expert * stride_w_e + n[:, None, None].to(tl.int64) * stride_w_n + k2[None, :, :]
    u_rows = g_rows + N * stride_w_n
    block_row = (tl.program_id(1) * BN) // BLOCK
    sg = w13_s + expert * stride_ws_e + block_row * stride_ws_n
    su = sg + (N // BLOCK) * stride_ws_n
    acc_g = tl.zeros([BN], dtype=tl.float32)
    acc_u = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, NB * BLOCK):
        kmask = k0 + k2 < K
        kb = k0 // BLOCK + nb
        bmask = kb * BLOCK < K
        if PREQUANT:  # quantised once per token by per_token_group_quant_fp8 (the same rounding)
            xq = tl.load(x_q + (pair // S) * stride_xq_t + k0 + k2, mask=kmask, other=0.0).to(tl.float32)
            xs = tl.load(x_s + (pair // S) * stride_xs_t + kb, mask=bmask, other=0.0)
        else:
            xk = tl.load(x + (pair // S) * stride_x_t + k0 + k2, mask=kmask, other=0.0).to(tl.float32)
            xq, xs = _quantize_groups(xk, FP8_MAX_, MIN_AMAX_)  # [NB, BLOCK], [NB]
        g = tl.load(g_rows + k0, mask=kmask[None, :, :], other=0.0).to(tl.float32)
        u = tl.load(u_rows + k0, mask=kmask[None, :, :], other=0.0).to(tl.float32)
        g_blocks = tl.sum(g * xq[None, :, :], 2)  # [BN, NB]
        u_blocks = tl.sum(u * xq[None, :, :], 2)
        scale_g = xs * tl.load(sg + kb, mask=bmask, other=0.0)
        scale_u = xs * tl.load(su + kb, mask=bmask, other=0.0)
        acc_g += tl.sum(g_blocks * scale_g[None, :], 1)
        acc_u += tl.sum(u_blocks * scale_u[None, :], 1)
    tl.store(inter + pair * stride_i_p + n, acc_g * tl.sigmoid(acc_g) * acc_u)
    if DOWN_PDL:
        gdc_launch_dependents()


@triton.jit
def _down_fp8_tokens_kernel(inter, a_q, a_s, w2, w2_s, out, topk_weights, topk_ids, N, stride_i_p, stride_aq_p,
                            stride_as_p, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, stride_o_t,
                            K: tl.constexpr, S: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr,
                            BN: tl.constexpr, NB: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr,
                            PREQUANT: tl.constexpr, PDL: tl.constexpr):
    """NB blocks of K per step; with NB = K / BLOCK every weight the program reads is loaded before it waits."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    s = tl.arange(0, BS)
    smask = s < S
    pair = t * S + s
    expert = tl.load(topk_ids + pair, mask=smask, other=0).to(tl.int64)  # written before gate_up ran
    nb = tl.arange(0, NB)
    k2 = nb[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [NB, BLOCK]
    w_ptr = (w2 + expert[:, None, None, None] * stride_w_e + n[None, :, None, None].to(tl.int64) * stride_w_n
             + k2[None, None, :, :])
    wmask = smask[:, None, None, None] & nmask[None, :, None, None]
    ws_ptr = w2_s + expert[:, None] * stride_ws_e + (n // BLOCK)[None, :].to(tl.int64) * stride_ws_n  # [BS, BN]
    w = tl.load(w_ptr, mask=wmask, other=0.0)  # [BS, BN, NB, BLOCK]
    pdl_enter(PDL)  # gate_up's inter is complete and visible from here on
    acc = tl.zeros([BS, BN], dtype=tl.float32)
    for k0 in range(0, K, NB * BLOCK):
        kb = k0 // BLOCK + nb
        a_rows = pair[:, None, None] * stride_i_p + k0 + k2[None, :, :]  # [BS, NB, BLOCK]
        if PREQUANT:  # quantised once by per_token_group_quant_fp8 (the same rounding)
            aq = tl.load(a_q + pair[:, None, None] * stride_aq_p + k0 + k2[None, :, :], mask=smask[:, None, None],
                         other=0.0).to(tl.float32)
            a_scale = tl.load(a_s + pair[:, None] * stride_as_p + kb[None, :], mask=smask[:, None], other=0.0)
        else:
            a = tl.load(inter + a_rows, mask=smask[:, None, None], other=0.0)
            aq, a_scale = _quantize_groups(tl.reshape(a, (BS * NB, BLOCK)), FP8_MAX_, MIN_AMAX_)
            aq, a_scale = tl.reshape(aq, (BS, NB, BLOCK)), tl.reshape(a_scale, (BS, NB))
        products = tl.sum(w.to(tl.float32) * aq[:, None, :, :], 3)  # [BS, BN, NB]
        w_scale = tl.load(ws_ptr[:, :, None] + kb[None, None, :], mask=smask[:, None, None] & nmask[None, :, None],
                          other=0.0)
        acc += tl.sum(products * a_scale[:, None, :] * w_scale, 2)
        if k0 + NB * BLOCK < K:
            w = tl.load(w_ptr + k0 + NB * BLOCK, mask=wmask, other=0.0)
    slot_out = acc * tl.load(topk_weights + pair, mask=smask, other=0.0)[:, None]
    tl.store(out + t * stride_o_t + n, tl.sum(slot_out, 0).to(out.dtype.element_ty), mask=nmask)


@triton.jit
def _unpack_e4m3(words, i: tl.constexpr):
    """Byte i of each 32-bit word as the e4m3 value it holds, in fp32."""
    return ((words >> (8 * i)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _down_fp8_packed_kernel(a_q, a_s, w2, w2_s, out, topk_weights, topk_ids, N, stride_aq_p, stride_as_p,
                            stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, stride_o_t,
                            K: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
                            PDL: tl.constexpr):
    """The down stage with `"packed"`: the S slots' [BN, K] e4m3 rows are loaded before the wait as 32-bit
    words, four values each (held that way they take a quarter of the registers: the [S padded to a power
    of two, BN, K] tile of _down_fp8_tokens_kernel needs 255 a thread at BN 4), then summed slot by slot,
    in slot order. The intermediate rows come quantised (prequant), read as words too."""
    NB: tl.constexpr = K // BLOCK
    WORDS: tl.constexpr = BLOCK // 4
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    nb = tl.arange(0, NB)
    words = nb[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [NB, WORDS]: word j holds k = 4j .. 4j + 3
    w2_words = w2.to(tl.pointer_type(tl.int32))
    rows = n.to(tl.int64)[:, None, None] * (stride_w_n // 4) + words[None, :, :]
    packed = ()
    experts = ()
    for s in tl.static_range(S):
        expert = tl.load(topk_ids + t * S + s).to(tl.int64)  # written before gate_up ran
        packed = packed + (tl.load(w2_words + expert * (stride_w_e // 4) + rows, mask=nmask[:, None, None], other=0),)
        experts = experts + (expert,)
    pdl_enter(PDL)  # gate_up's intermediate rows, quantised, are complete and visible from here on
    a_words = a_q.to(tl.pointer_type(tl.int32))
    total = tl.zeros([BN], dtype=tl.float32)
    for s in tl.static_range(S):
        pair = t * S + s
        a_packed = tl.load(a_words + pair * (stride_aq_p // 4) + words)  # [NB, WORDS]
        products = tl.zeros([BN, NB], dtype=tl.float32)
        for i in tl.static_range(4):
            products += tl.sum(_unpack_e4m3(packed[s], i) * _unpack_e4m3(a_packed, i)[None, :, :], 2)
        a_scale = tl.load(a_s + pair * stride_as_p + nb)
        w_scale = tl.load(w2_s + experts[s] * stride_ws_e + (n // BLOCK).to(tl.int64)[:, None] * stride_ws_n
                          + nb[None, :], mask=nmask[:, None], other=0.0)
        total += tl.sum(products * a_scale[None, :] * w_scale, 1) * tl.load(topk_weights + pair)
    tl.store(out + t * stride_o_t + n, total.to(out.dtype.element_ty), mask=nmask)


def fused_moe_fp8_pairs(x, w13, w2, w13_s, w2_s, weights, topk_ids, out, inter, block: int, cfg: dict,
                        x_groups=None) -> None:
    """x [T, H]; w13 [E, 2I, H], w2 [E, H, I] e4m3 with their block scales; weights [T*S] fp32;
    topk_ids [T, S]; inter [T*S, I] fp32 -> out [T, H]. x_groups: x's e4m3 groups, quantised already
    (read as with "prequant")."""
    T, H = x.shape
    S, I = topk_ids.shape[1], w2.shape[2]
    up, down = cfg["gate_up"], cfg["down"]
    pdl = use_pdl(x.device)
    down_pdl = cfg.get("pdl", True) and pdl
    up_bn = min(up["BLOCK_N"], block)
    prequant, x_q, x_s = gemv_features(x, block, bool(up.get("prequant")), x_groups)
    _gate_up_fp8_pairs_kernel[(T * S, I // up_bn)](
        x, x_q, x_s, w13, w13_s, inter, topk_ids, I, x.stride(0), x_q.stride(0), x_s.stride(0), w13.stride(0),
        w13.stride(1), w13_s.stride(0), w13_s.stride(1), inter.stride(0),
        K=H, S=S, BLOCK=block, NB=up["NB"], BN=up_bn, FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX, PREQUANT=prequant,
        PDL=pdl, DOWN_PDL=down_pdl, num_warps=up["num_warps"], launch_pdl=pdl)
    down_nb = down.get("NB", 1)
    if (I // block) % down_nb:
        raise ValueError(f"the down stage's NB {down_nb} must divide the {I // block} blocks of the intermediate size")
    down_prequant = bool(down.get("prequant"))
    a_q, a_s = per_token_group_quant_fp8(inter, block) if down_prequant else (inter, inter)
    if down.get("packed"):
        if not down_prequant:
            raise ValueError('the packed down stage reads the intermediate rows quantised: its config needs "prequant"')
        _down_fp8_packed_kernel[(T, triton.cdiv(H, down["BLOCK_N"]))](
            a_q, a_s, w2, w2_s, out, weights, topk_ids, H, a_q.stride(0), a_s.stride(0), w2.stride(0), w2.stride(1),
            w2_s.stride(0), w2_s.stride(1), out.stride(0), K=I, S=S, BLOCK=block, BN=down["BLOCK_N"], PDL=down_pdl,
            num_warps=down["num_warps"], launch_pdl=down_pdl)
        return
    _down_fp8_tokens_kernel[(T, triton.cdiv(H, down["BLOCK_N"]))](
        inter, a_q, a_s, w2, w2_s, out, weights, topk_ids, H, inter.stride(0), a_q.stride(0), a_s.stride(0),
        w2.stride(0), w2.stride(1), w2_s.stride(0), w2_s.stride(1), out.stride(0),
        K=I, S=S, BS=triton.next_power_of_2(S), BLOCK=block, BN=down["BLOCK_N"], NB=down_nb, FP8_MAX_=FP8_MAX,
        MIN_AMAX_=MIN_AMAX, PREQUANT=down_prequant, PDL=down_pdl, num_warps=down["num_warps"], launch_pdl=down_pdl)
