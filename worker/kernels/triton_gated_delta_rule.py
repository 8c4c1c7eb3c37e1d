"""Gated delta rule, Triton kernels (the torch reference is worker.kernels.gated_delta_rule).

Prefill (`chunk_gated_delta_rule`) works in chunks of BT = 64 tokens. Within a chunk, with
G the cumulative log-decay from the chunk start, S0 the state before the chunk and
L[t, s] = beta_t exp(G_t - G_s) k_t.k_s for s < t, the deltas of the recurrence are

    delta = X (beta * (v - exp(G) * (k S0)))     with X = (I + L)^-1

and the output and the next state are

    o  = exp(G) * (q S0) + (causal(q k^T) * exp(G_t - G_s)) delta
    S1 = exp(G_last) S0 + (k * exp(G_last - G))^T delta.

X depends on k, g and beta only, so one launch computes it for every chunk and head in parallel;
a second launch walks each sequence's chunks in order per (value head, V tile), with the state in
registers, and writes outputs and the final state. Nothing runs on the host between them.

Decode and verify (`fused_recurrent_gated_delta_rule`) step token by token, one program per
(sequence, value head, V tile), reading slot num_accepted-1 once and writing every slot j.

No launch path reads device memory on the host, so both can be captured in CUDA graphs.
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

CHUNK = 64  # BT of the chunked kernels; X is built from four 16 x 16 diagonal blocks
SUB = 16


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 accuracy (three tf32 products); bf16/fp16 inputs are rounded far more already."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- shared pieces


@triton.jit
def _find_sequence(cu_seqlens, chunk, N, BT: tl.constexpr, LOG_N: tl.constexpr):
    """The sequence n owning virtual chunk `chunk`.

    Sequence n's chunks are numbered from cu_seqlens[n] // BT + n; these starts increase with n and
    leave room for ceil(len / BT) chunks, so a grid of T // BT + N programs covers every chunk with
    no host-side chunk table. A binary search finds the last start <= chunk.
    """
    lo = chunk * 0
    hi = lo + N
    for _ in tl.static_range(LOG_N):
        mid = (lo + hi) // 2
        ok = tl.load(cu_seqlens + mid) // BT + mid <= chunk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def _row_scale(x, L2NORM: tl.constexpr):
    """1 / ||row|| (with the reference's eps) of a [R, C] tile, or ones."""
    if L2NORM:
        xf = x.to(tl.float32)
        return tl.rsqrt(tl.sum(xf * xf, 1) + 1e-6)
    return tl.full([x.shape[0]], 1.0, dtype=tl.float32)


# ---------------------------------------------------------------- chunked prefill


@triton.jit
def _decay_block(ki, kj, bi, si, sj, Gi, Gj, DIAG: tl.constexpr, DOT: tl.constexpr):
    """One 16 x 16 block of L = beta_t exp(G_t - G_s) k_t.k_s (strictly lower on the diagonal); k rows
    come as loaded, with si, sj their l2 scales."""
    a = tl.dot(ki, tl.trans(kj), input_precision=DOT) * tl.exp(Gi[:, None] - Gj[None, :]) * (bi * si)[:, None] * sj[None, :]
    if DIAG:
        r = tl.arange(0, 16)
        a = tl.where(r[:, None] > r[None, :], a, 0.0)
    return a


@triton.jit
def _unit_lower_inverse(L):
    """(I + L)^-1 for a strictly lower-triangular 16 x 16 L, by forward substitution over rows."""
    r = tl.arange(0, 16)
    X = (r[:, None] == r[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        l_i = tl.sum(tl.where(r[:, None] == i, L, 0.0), 0)  # row i of L, over columns
        X = tl.where(r[:, None] == i, X - tl.sum(l_i[:, None] * X, 0)[None, :], X)
    return X


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")  # 16 x 16 x 16: exact fp32 is free at this size


@triton.jit
def _store_block(X, rows, row_mask, col0, block, stride_x_t):
    c = col0 + tl.arange(0, 16)
    tl.store(X + rows[:, None] * stride_x_t + c[None, :], block, mask=row_mask[:, None])


@triton.jit
def _chunk_inverse_kernel(
    k, g, beta, cu_seqlens, X,
    stride_k_t, stride_k_h, stride_g_t, stride_b_t, stride_x_t,
    N, RATIO,
    K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, LOG_N: tl.constexpr,
    L2NORM: tl.constexpr, DOT: tl.constexpr,
):
    """X[t, hv, :] = row t of (I + L)^-1 for the chunk holding token t (lower triangle only)."""
    chunk = tl.program_id(0)
    hv = tl.program_id(1)
    n = _find_sequence(cu_seqlens, chunk, N, BT, LOG_N)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    cs = start + (chunk - start // BT - n) * BT
    if cs >= end:
        return
    cols = tl.arange(0, BK)
    cmask = cols < K
    kh = k + (hv // RATIO) * stride_k_h
    r0 = cs.to(tl.int64) + tl.arange(0, 16)
    r1 = r0 + 16
    r2 = r0 + 32
    r3 = r0 + 48
    m0, m1, m2, m3 = r0 < end, r1 < end, r2 < end, r3 < end
    k0 = tl.load(kh + r0[:, None] * stride_k_t + cols[None, :], mask=m0[:, None] & cmask[None, :], other=0.0)
    k1 = tl.load(kh + r1[:, None] * stride_k_t + cols[None, :], mask=m1[:, None] & cmask[None, :], other=0.0)
    k2 = tl.load(kh + r2[:, None] * stride_k_t + cols[None, :], mask=m2[:, None] & cmask[None, :], other=0.0)
    k3 = tl.load(kh + r3[:, None] * stride_k_t + cols[None, :], mask=m3[:, None] & cmask[None, :], other=0.0)
    g0 = tl.load(g + r0 * stride_g_t + hv, mask=m0, other=0.0).to(tl.float32)
    g1 = tl.load(g + r1 * stride_g_t + hv, mask=m1, other=0.0).to(tl.float32)
    g2 = tl.load(g + r2 * stride_g_t + hv, mask=m2, other=0.0).to(tl.float32)
    g3 = tl.load(g + r3 * stride_g_t + hv, mask=m3, other=0.0).to(tl.float32)
    b0 = tl.load(beta + r0 * stride_b_t + hv, mask=m0, other=0.0).to(tl.float32)
    b1 = tl.load(beta + r1 * stride_b_t + hv, mask=m1, other=0.0).to(tl.float32)
    b2 = tl.load(beta + r2 * stride_b_t + hv, mask=m2, other=0.0).to(tl.float32)
    b3 = tl.load(beta + r3 * stride_b_t + hv, mask=m3, other=0.0).to(tl.float32)
    s0, s1, s2, s3 = _row_scale(k0, L2NORM), _row_scale(k1, L2NORM), _row_scale(k2, L2NORM), _row_scale(k3, L2NORM)
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    G2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    G3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)

    D0 = _unit_lower_inverse(_decay_block(k0, k0, b0, s0, s0, G0, G0, True, DOT))
    D1 = _unit_lower_inverse(_decay_block(k1, k1, b1, s1, s1, G1, G1, True, DOT))
    D2 = _unit_lower_inverse(_decay_block(k2, k2, b2, s2, s2, G2, G2, True, DOT))
    D3 = _unit_lower_inverse(_decay_block(k3, k3, b3, s3, s3, G3, G3, True, DOT))
    L10 = _decay_block(k1, k0, b1, s1, s0, G1, G0, False, DOT)
    L20 = _decay_block(k2, k0, b2, s2, s0, G2, G0, False, DOT)
    L21 = _decay_block(k2, k1, b2, s2, s1, G2, G1, False, DOT)
    L30 = _decay_block(k3, k0, b3, s3, s0, G3, G0, False, DOT)
    L31 = _decay_block(k3, k1, b3, s3, s1, G3, G1, False, DOT)
    L32 = _decay_block(k3, k2, b3, s3, s2, G3, G2, False, DOT)
    # Block forward substitution: X_ij = -D_i sum_{j<=m<i} L_im X_mj, X_ii = D_i.
    X10 = -_mm(D1, _mm(L10, D0))
    X21 = -_mm(D2, _mm(L21, D1))
    X32 = -_mm(D3, _mm(L32, D2))
    X20 = -_mm(D2, _mm(L20, D0) + _mm(L21, X10))
    X31 = -_mm(D3, _mm(L31, D1) + _mm(L32, X21))
    X30 = -_mm(D3, _mm(L30, D0) + _mm(L31, X10) + _mm(L32, X20))

    Xh = X + hv * BT
    _store_block(Xh, r0, m0, 0, D0, stride_x_t)
    _store_block(Xh, r1, m1, 0, X10, stride_x_t)
    _store_block(Xh, r1, m1, 16, D1, stride_x_t)
    _store_block(Xh, r2, m2, 0, X20, stride_x_t)
    _store_block(Xh, r2, m2, 16, X21, stride_x_t)
    _store_block(Xh, r2, m2, 32, D2, stride_x_t)
    _store_block(Xh, r3, m3, 0, X30, stride_x_t)
    _store_block(Xh, r3, m3, 16, X31, stride_x_t)
    _store_block(Xh, r3, m3, 32, X32, stride_x_t)
    _store_block(Xh, r3, m3, 48, D3, stride_x_t)


@triton.jit
def _chunk_step(qh, kh, vh, g, beta, Xh, oh, h, cs, end, scale, hv, cols_k, kmask, cols_v, vmask,
                stride_q_t, stride_k_t, stride_v_t, stride_o_t, stride_g_t, stride_b_t, stride_x_t,
                BT: tl.constexpr, L2NORM: tl.constexpr, DOT: tl.constexpr):
    """Output of one chunk and the state after it, from the state h before it.

    q and k go into the products as loaded (the l2 norms become row scales of the results), so the
    [BT, K] tiles stay in the input dtype; h meets them rounded to that dtype, as in fla."""
    t = tl.arange(0, BT)
    causal = t[:, None] >= t[None, :]
    rmask = t < end - cs  # per-chunk base pointers keep the tile offsets 32-bit (fewer registers)
    qk_mask = rmask[:, None] & kmask[None, :]
    qr = tl.load(qh + cs * stride_q_t + (t[:, None] * stride_q_t + cols_k[None, :]), mask=qk_mask, other=0.0)
    kr = tl.load(kh + cs * stride_k_t + (t[:, None] * stride_k_t + cols_k[None, :]), mask=qk_mask, other=0.0)
    qs = _row_scale(qr, L2NORM) * scale
    ks = _row_scale(kr, L2NORM)
    vc = tl.load(vh + cs * stride_v_t + (t[:, None] * stride_v_t + cols_v[None, :]),
                 mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
    gc = tl.load(g + cs * stride_g_t + (t * stride_g_t + hv), mask=rmask, other=0.0).to(tl.float32)
    bc = tl.load(beta + cs * stride_b_t + (t * stride_b_t + hv), mask=rmask, other=0.0).to(tl.float32)
    xc = tl.load(Xh + cs * stride_x_t + (t[:, None] * stride_x_t + t[None, :]), mask=rmask[:, None] & causal,
                 other=0.0)
    G = tl.cumsum(gc, 0)
    G_last = tl.sum(gc, 0)
    decay = tl.exp(G)
    hc = h.to(qr.dtype)
    r = bc[:, None] * (vc - (decay * ks)[:, None] * tl.dot(kr, hc, input_precision=DOT))
    delta = tl.dot(xc, r, input_precision=DOT)
    qk = tl.dot(qr, tl.trans(kr), input_precision=DOT)
    a = tl.where(causal, qk * (qs[:, None] * ks[None, :]) * tl.exp(G[:, None] - G[None, :]), 0.0)
    oc = (decay * qs)[:, None] * tl.dot(qr, hc, input_precision=DOT) + tl.dot(a, delta, input_precision=DOT)
    tl.store(oh + cs * stride_o_t + (t[:, None] * stride_o_t + cols_v[None, :]), oc.to(oh.dtype.element_ty),
             mask=rmask[:, None] & vmask[None, :])
    kd = (delta * (tl.exp(G_last - G) * ks)[:, None]).to(kr.dtype)
    return h * tl.exp(G_last) + tl.dot(tl.trans(kr), kd, input_precision=DOT)


@triton.jit
def _chunk_recurrence_kernel(
    q, k, v, g, beta, X, o, cu_seqlens, ssm_states, state_indices, num_accepted, has_initial_state,
    scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_o_t, stride_o_h,
    stride_g_t, stride_b_t, stride_x_t, stride_s_g, stride_s_slot, stride_s_h,
    RATIO,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    L2NORM: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One (V tile, value head, sequence): walk the chunks in order with the state in registers."""
    vb = tl.program_id(0)
    hv = tl.program_id(1)
    n = tl.program_id(2)
    start = tl.load(cu_seqlens + n).to(tl.int64)
    end = tl.load(cu_seqlens + n + 1).to(tl.int64)
    t = tl.arange(0, BT)
    cols_v = vb * BV + tl.arange(0, BV)
    vmask = cols_v < V
    oh = o + hv * stride_o_h
    group = tl.load(state_indices + n).to(tl.int64)
    if group < 0:  # the reference leaves zeros in a skipped sequence's rows
        cs = start
        while cs < end:
            rows = cs + t
            tl.store(oh + rows[:, None] * stride_o_t + cols_v[None, :], tl.zeros([BT, BV], dtype=o.dtype.element_ty),
                     mask=(rows < end)[:, None] & vmask[None, :])
            cs += BT
        return
    if end <= start:
        return
    cols_k = tl.arange(0, BK)
    kmask = cols_k < K
    hmask = kmask[:, None] & vmask[None, :]
    s_base = ssm_states + group * stride_s_g + hv * stride_s_h + cols_k[:, None] * V + cols_v[None, :]
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if tl.load(has_initial_state + n):
        slot = tl.load(num_accepted + n).to(tl.int64) - 1
        h = tl.load(s_base + slot * stride_s_slot, mask=hmask, other=0.0).to(tl.float32)
    qh = q + (hv // RATIO) * stride_q_h
    kh = k + (hv // RATIO) * stride_k_h
    vh = v + hv * stride_v_h
    Xh = X + hv * BT
    if INTERPRET:  # the interpreter cannot index a range by loaded bounds; compiled loops pipeline loads
        cs = start
        while cs < end:
            h = _chunk_step(qh, kh, vh, g, beta, Xh, oh, h, cs, end, scale, hv, cols_k, kmask, cols_v, vmask,
                            stride_q_t, stride_k_t, stride_v_t, stride_o_t, stride_g_t, stride_b_t, stride_x_t,
                            BT, L2NORM, DOT)
            cs += BT
    else:
        for cs in range(start, end, BT):
            h = _chunk_step(qh, kh, vh, g, beta, Xh, oh, h, cs, end, scale, hv, cols_k, kmask, cols_v, vmask,
                            stride_q_t, stride_k_t, stride_v_t, stride_o_t, stride_g_t, stride_b_t, stride_x_t,
                            BT, L2NORM, DOT)
    tl.store(s_base, h.to(ssm_states.dtype.element_ty), mask=hmask)


def _chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu_seqlens, ssm_states, state_indices, num_accepted,
                                has_initial_state, scale, use_qk_l2norm, BV=None, num_warps=None, num_stages=None):
    """Launcher: allocates the output and X, picks tiles. BV / num_warps / num_stages override the choice."""
    T, H, K = q.shape
    HV, V = v.shape[1:]
    N = state_indices.shape[0]
    out = _empty_output(v)
    if T == 0 or N == 0:
        return out
    BK = max(16, triton.next_power_of_2(K))
    if BV is None:
        # Long single sequences have few (head, tile) programs: narrower tiles keep the SMs busy.
        BV = 64
        while BV > 16 and N * HV * triton.cdiv(V, BV) < 2 * _num_sms(q.device):
            BV //= 2
        BV = min(BV, max(16, triton.next_power_of_2(V)))
    X = _empty_output(g, shape=(T, HV, CHUNK), dtype=torch.float32)
    dot = _dot_precision(q.dtype)
    log_n = max(1, math.ceil(math.log2(N + 1)))
    _chunk_inverse_kernel[(T // CHUNK + N, HV)](
        k, g, beta, cu_seqlens, X,
        k.stride(0), k.stride(1), g.stride(0), beta.stride(0), X.stride(0),
        N, HV // H,
        K=K, BK=BK, BT=CHUNK, LOG_N=log_n, L2NORM=use_qk_l2norm, DOT=dot,
        num_warps=4,
    )
    _chunk_recurrence_kernel[(triton.cdiv(V, BV), HV, N)](
        q, k, v, g, beta, X, out, cu_seqlens, ssm_states, state_indices, num_accepted, has_initial_state,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        g.stride(0), beta.stride(0), X.stride(0), ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2),
        HV // H,
        K=K, V=V, BK=BK, BV=BV, BT=CHUNK, L2NORM=use_qk_l2norm, DOT=dot, INTERPRET=_interpreting(),
        num_warps=num_warps or 4, num_stages=num_stages or 2,
    )
    return out


# ---------------------------------------------------------------- decode / verify


@triton.jit
def _fused_recurrent_kernel(
    q, k, v, g, beta, o, ssm_states, state_indices, num_accepted,
    scale,
    stride_q_n, stride_q_t, stride_q_h, stride_k_n, stride_k_t, stride_k_h,
    stride_v_n, stride_v_t, stride_v_h, stride_o_n, stride_o_t, stride_o_h,
    stride_g_n, stride_g_t, stride_b_n, stride_b_t, stride_s_g, stride_s_slot, stride_s_h,
    RATIO,
    Q: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2NORM: tl.constexpr,
):
    """One (V tile, value head, sequence) of a decode / verify step."""
    vb = tl.program_id(0)
    hv = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    cols_v = vb * BV + tl.arange(0, BV)
    vmask = cols_v < V
    o_ptr = o + n * stride_o_n + hv * stride_o_h + cols_v
    group = tl.load(state_indices + n).to(tl.int64)
    if group < 0:
        for j in tl.static_range(Q):
            tl.store(o_ptr + j * stride_o_t, tl.zeros([BV], dtype=o.dtype.element_ty), mask=vmask)
        return
    cols_k = tl.arange(0, BK)
    kmask = cols_k < K
    hmask = kmask[:, None] & vmask[None, :]
    s_base = ssm_states + group * stride_s_g + hv * stride_s_h + cols_k[:, None] * V + cols_v[None, :]
    slot = tl.load(num_accepted + n).to(tl.int64) - 1
    h = tl.load(s_base + slot * stride_s_slot, mask=hmask, other=0.0).to(tl.float32)
    hk = hv // RATIO
    q_ptr = q + n * stride_q_n + hk * stride_q_h + cols_k
    k_ptr = k + n * stride_k_n + hk * stride_k_h + cols_k
    v_ptr = v + n * stride_v_n + hv * stride_v_h + cols_v
    g_ptr = g + n * stride_g_n + hv
    b_ptr = beta + n * stride_b_n + hv
    for j in tl.static_range(Q):
        qj = tl.load(q_ptr + j * stride_q_t, mask=kmask, other=0.0).to(tl.float32)
        kj = tl.load(k_ptr + j * stride_k_t, mask=kmask, other=0.0).to(tl.float32)
        if L2NORM:
            qj = qj * tl.rsqrt(tl.sum(qj * qj, 0) + 1e-6)
            kj = kj * tl.rsqrt(tl.sum(kj * kj, 0) + 1e-6)
        qj = qj * scale
        vj = tl.load(v_ptr + j * stride_v_t, mask=vmask, other=0.0).to(tl.float32)
        gj = tl.load(g_ptr + j * stride_g_t).to(tl.float32)
        bj = tl.load(b_ptr + j * stride_b_t).to(tl.float32)
        h = h * tl.exp(gj)
        delta = bj * (vj - tl.sum(h * kj[:, None], 0))
        h = h + kj[:, None] * delta[None, :]
        tl.store(o_ptr + j * stride_o_t, tl.sum(h * qj[:, None], 0).to(o.dtype.element_ty), mask=vmask)
        tl.store(s_base + j * stride_s_slot, h.to(ssm_states.dtype.element_ty), mask=hmask)


def _fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, ssm_states, state_indices, num_accepted, scale,
                                          use_qk_l2norm, BV=None, num_warps=None, num_stages=None):
    """Launcher: allocates the output, picks tiles. BV / num_warps / num_stages override the choice."""
    N, Q, H, K = q.shape
    HV, V = v.shape[2:]
    out = _empty_output(v)
    if N == 0:
        return out
    BK = triton.next_power_of_2(K)
    if BV is None:
        # Measured on H100 (benchmarks/results): one warp per program; 16-wide tiles while a batch gives
        # fewer than four 32-wide programs per SM, 32-wide (full 128-byte rows) above.
        BV = 32 if N * HV * triton.cdiv(V, 32) >= 4 * _num_sms(q.device) else 16
        BV = min(BV, max(8, triton.next_power_of_2(V)))
    _fused_recurrent_kernel[(triton.cdiv(V, BV), HV, N)](
        q, k, v, g, beta, out, ssm_states, state_indices, num_accepted,
        scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *g.stride()[:2], *beta.stride()[:2], *ssm_states.stride()[:3],
        HV // H,
        Q=Q, K=K, V=V, BK=BK, BV=BV, L2NORM=use_qk_l2norm,
        num_warps=num_warps or 1, num_stages=num_stages or 2,
    )
    return out


# ---------------------------------------------------------------- gating


@triton.jit
def _gdn_gating_kernel(a, b, A_log, dt_bias, g, beta, stride_a_t, stride_b_t, total, HV, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    t = i // HV
    h = i % HV
    x = tl.load(a + t * stride_a_t + h, mask=mask, other=0.0).to(tl.float32)
    x = x + tl.load(dt_bias + h, mask=mask, other=0.0).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # torch's threshold
    A = tl.load(A_log + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(g + i, -tl.exp(A) * softplus, mask=mask)
    y = tl.load(b + t * stride_b_t + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(beta + i, tl.sigmoid(y), mask=mask)


# ---------------------------------------------------------------- public functions


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels address the last dim with stride 1 and take the other strides as given."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _check_states(ssm_states, HV, K, V):
    _check(ssm_states.dim() == 5 and tuple(ssm_states.shape[2:]) == (HV, K, V),
           f"ssm_states must be [G, 1+k, {HV}, {K}, {V}], got {tuple(ssm_states.shape)}")
    _check(ssm_states.stride(4) == 1 and ssm_states.stride(3) == V,
           "ssm_states must be contiguous in its last two dims [K, V]")


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """a, b: [T, HV] -> g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), both fp32 [T, HV]."""
    _check(a.dim() == 2 and a.shape == b.shape, f"a and b must be [T, HV], got {tuple(a.shape)}, {tuple(b.shape)}")
    T, HV = a.shape
    _check(A_log.shape == (HV,) and dt_bias.shape == (HV,), f"A_log and dt_bias must be [{HV}]")
    a, b = _inner_contiguous(a), _inner_contiguous(b)
    g = _empty_output(a, dtype=torch.float32)
    beta = _empty_output(a, dtype=torch.float32)
    total = T * HV
    if total:
        BLOCK = 1024
        _gdn_gating_kernel[(triton.cdiv(total, BLOCK),)](a, b, A_log, dt_bias, g, beta, a.stride(0), b.stride(0),
                                                           total, HV, BLOCK=BLOCK)
    return g, beta


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor,  # [T, HV] fp32 log-decay
    beta: torch.Tensor,  # [T, HV]
    cu_seqlens: torch.Tensor,  # [N+1]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    state_indices: torch.Tensor,  # [N] slot group, PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N] initial state is slot num_accepted-1 of the group
    has_initial_state: torch.Tensor,  # [N] bool; False starts from zeros
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:  # [T, HV, V] in v's dtype
    """Prefill over packed sequences; each sequence's final state is written into slot 0 of its group."""
    _check(q.dim() == 3 and k.shape == q.shape, f"q and k must be [T, H, K], got {tuple(q.shape)}, {tuple(k.shape)}")
    T, H, K = q.shape
    _check(v.dim() == 3 and v.shape[0] == T and v.shape[1] % H == 0,
           f"v must be [{T}, HV, V] with HV a multiple of {H}, got {tuple(v.shape)}")
    HV, V = v.shape[1:]
    _check(g.shape == (T, HV) and beta.shape == (T, HV), f"g and beta must be [{T}, {HV}]")
    N = state_indices.shape[0]
    _check(cu_seqlens.shape == (N + 1,), f"cu_seqlens must be [{N + 1}] for {N} state indices")
    _check(num_accepted.shape == (N,) and has_initial_state.shape == (N,),
           f"num_accepted and has_initial_state must be [{N}]")
    _check_states(ssm_states, HV, K, V)
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    g, beta = _inner_contiguous(g), _inner_contiguous(beta)
    return _chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu_seqlens, ssm_states, state_indices, num_accepted,
                                       has_initial_state, K ** -0.5 if scale is None else scale, use_qk_l2norm)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,  # [N, Q, H, K] with Q = 1 + k
    k: torch.Tensor,  # [N, Q, H, K]
    v: torch.Tensor,  # [N, Q, HV, V]
    g: torch.Tensor,  # [N, Q, HV]
    beta: torch.Tensor,  # [N, Q, HV]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    state_indices: torch.Tensor,  # [N] slot group, PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N] initial state is slot num_accepted-1 of the group
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:  # [N, Q, HV, V]
    """Decode / speculative verify: starts from slot num_accepted-1, writes the state after position j into slot j."""
    _check(q.dim() == 4 and k.shape == q.shape, f"q and k must be [N, Q, H, K], got {tuple(q.shape)}, {tuple(k.shape)}")
    N, Q, H, K = q.shape
    _check(v.dim() == 4 and v.shape[:2] == (N, Q) and v.shape[2] % H == 0,
           f"v must be [{N}, {Q}, HV, V] with HV a multiple of {H}, got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    _check(g.shape == (N, Q, HV) and beta.shape == (N, Q, HV), f"g and beta must be [{N}, {Q}, {HV}]")
    _check(state_indices.shape == (N,) and num_accepted.shape == (N,), f"state_indices and num_accepted must be [{N}]")
    _check_states(ssm_states, HV, K, V)
    _check(ssm_states.shape[1] >= Q, f"ssm_states has {ssm_states.shape[1]} slots per group, a step of {Q} needs {Q}")
    q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
    g, beta = _inner_contiguous(g), _inner_contiguous(beta)
    return _fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, ssm_states, state_indices, num_accepted,
                                                 K ** -0.5 if scale is None else scale, use_qk_l2norm)
