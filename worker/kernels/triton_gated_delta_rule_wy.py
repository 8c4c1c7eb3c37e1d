"""Chunked gated delta rule, the parallel first stage: everything within a chunk that does not depend on the
state (the torch reference is `chunk_prepare` in worker.kernels.gated_delta_rule_chunked, which gives the algebra).

With G the cumulative log-decay from the chunk start and q, k l2-normalised, per (chunk, value head):
X = (I + L)^-1 for L = strictly_lower(beta_t exp(G_t - G_s) k_t.k_s), the WY representation w = X (beta exp(G) k),
u = X (beta v), the intra-chunk attention A = lower(q_t.k_s exp(G_t - G_s)) and the row scales G, ks, qd.

X comes from block doubling: the inverse over diagonal blocks of 2S rows is X - X C X, X the one over blocks of S
rows and C the off-diagonal S-blocks of L; this is block forward substitution, and as stable. Two ways to run it:
`_chunk_solve_kernel` + `_chunk_wy_kernel` (two 32-row halves as independent chains of small products, then the
WY products as 64-row tensor-core products; few registers per program, so many programs per SM) and
`_chunk_prepare_kernel` (everything in one program with 64 x 64 products).

Sequence n's chunks are numbered from cu_seqlens[n] // BT + n, so grids of T // BT + N chunks need no host-side
chunk table and nothing is read back on the host.
"""

import math

import torch
import triton
import triton.language as tl

BT = 64  # chunk length: two halves of 32 rows in _chunk_solve_kernel


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 accuracy (three tf32 products); bf16/fp16 inputs are rounded far more already."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _log_n(N: int) -> int:
    return max(1, math.ceil(math.log2(N + 1)))


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


@triton.jit
def _double(X, L, t, S: tl.constexpr, DOT: tl.constexpr):
    """(I + L)^-1 over diagonal blocks of 2S rows from X, the one over blocks of S rows: X - X C X with C the
    off-diagonal S-blocks of L. This is block forward substitution, and as stable."""
    C = tl.where((t[:, None] // (2 * S) == t[None, :] // (2 * S)) & (t[:, None] // S != t[None, :] // S), L, 0.0)
    return X - tl.dot(tl.dot(X, C, input_precision=DOT), X, input_precision=DOT)


@triton.jit
def _unit_lower_inverse(L, DOT: tl.constexpr):
    """(I + L)^-1 for a strictly lower-triangular 32 x 32 L, doubling the blocks from 1 x 1."""
    tl.static_assert(L.shape[0] == 32)
    t = tl.arange(0, 32)
    X = (t[:, None] == t[None, :]).to(tl.float32) - tl.where(t[:, None] // 2 == t[None, :] // 2, L, 0.0)
    X = _double(X, L, t, 2, DOT)
    X = _double(X, L, t, 4, DOT)
    X = _double(X, L, t, 8, DOT)
    return _double(X, L, t, 16, DOT)


@triton.jit
def _decay_block(kk, bi, si, sj, Gi, Gj, DIAG: tl.constexpr):
    """A block of L = beta_t exp(G_t - G_s) k_t.k_s from kk = k_t.k_s as loaded and the rows' l2 scales si, sj;
    strictly lower on the diagonal."""
    a = kk * (bi * si)[:, None] * sj[None, :]
    if DIAG:
        r = tl.arange(0, kk.shape[0])
        lower = r[:, None] > r[None, :]
        return tl.where(lower, a * tl.exp(tl.where(lower, Gi[:, None] - Gj[None, :], 0.0)), 0.0)
    return a * tl.exp(Gi[:, None] - Gj[None, :])  # rows of a later block: G_t <= G_s


@triton.jit
def _chunk_start(cu_seqlens, state_indices, chunk, N, BT: tl.constexpr, LOG_N: tl.constexpr):
    """(first row, end of its sequence) of virtual chunk `chunk`; first row >= end for no chunk or a PAD one."""
    n = _find_sequence(cu_seqlens, chunk, N, BT, LOG_N)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    cs = start + (chunk - start // BT - n) * BT
    end = tl.where(tl.load(state_indices + n) < 0, start, end)
    return cs.to(tl.int64), end.to(tl.int64)


@triton.jit
def _chunk_solve_kernel(
    k, g, beta, cu_seqlens, state_indices, X, G, ks,
    stride_k_t, stride_k_h, stride_g_t, stride_b_t, stride_x_t, stride_r_t,
    N, RATIO,
    K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr, BT: tl.constexpr, LOG_N: tl.constexpr,
    L2NORM: tl.constexpr, DOT: tl.constexpr,
):
    """X = (I + L)^-1, G and ks of one (chunk, value head), in 32-row halves: the two diagonal inverses are
    independent chains of 32 x 32 products, and X_10 = -X_11 L_10 X_00."""
    tl.static_assert(BT == 64, "two halves of 32 rows")
    hv = tl.program_id(0)  # value heads sharing a key head run side by side and share its loads in L2
    cs, end = _chunk_start(cu_seqlens, state_indices, tl.program_id(1), N, BT, LOG_N)
    if cs >= end:
        return
    H2: tl.constexpr = BT // 2
    r0 = tl.arange(0, H2)
    r1 = r0 + H2
    m0, m1 = r0 < end - cs, r1 < end - cs
    kh = k + (hv // RATIO) * stride_k_h + cs * stride_k_t
    kk00 = tl.zeros([H2, H2], dtype=tl.float32)
    kk11 = tl.zeros([H2, H2], dtype=tl.float32)
    kk10 = tl.zeros([H2, H2], dtype=tl.float32)
    ss0 = tl.zeros([H2], dtype=tl.float32)
    ss1 = tl.zeros([H2], dtype=tl.float32)
    for c in range(0, BK, BKC):  # K in slices keeps the operands of the products small
        cols = c + tl.arange(0, BKC)
        k0 = tl.load(kh + r0[:, None] * stride_k_t + cols[None, :], mask=m0[:, None] & (cols < K)[None, :], other=0.0)
        k1 = tl.load(kh + r1[:, None] * stride_k_t + cols[None, :], mask=m1[:, None] & (cols < K)[None, :], other=0.0)
        kk00 = tl.dot(k0, tl.trans(k0), kk00, input_precision=DOT)
        kk11 = tl.dot(k1, tl.trans(k1), kk11, input_precision=DOT)
        kk10 = tl.dot(k1, tl.trans(k0), kk10, input_precision=DOT)
        if L2NORM:
            ss0 += tl.sum(k0.to(tl.float32) * k0.to(tl.float32), 1)
            ss1 += tl.sum(k1.to(tl.float32) * k1.to(tl.float32), 1)
    if L2NORM:
        s0, s1 = tl.rsqrt(ss0 + 1e-6), tl.rsqrt(ss1 + 1e-6)
    else:
        s0, s1 = ss0 + 1.0, ss1 + 1.0
    g0 = tl.load(g + cs * stride_g_t + (r0 * stride_g_t + hv), mask=m0, other=0.0).to(tl.float32)
    g1 = tl.load(g + cs * stride_g_t + (r1 * stride_g_t + hv), mask=m1, other=0.0).to(tl.float32)
    b0 = tl.load(beta + cs * stride_b_t + (r0 * stride_b_t + hv), mask=m0, other=0.0).to(tl.float32)
    b1 = tl.load(beta + cs * stride_b_t + (r1 * stride_b_t + hv), mask=m1, other=0.0).to(tl.float32)
    G0 = tl.cumsum(g0, 0)  # rows past the end add 0, so they repeat G_last
    G1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    X00 = _unit_lower_inverse(_decay_block(kk00, b0, s0, s0, G0, G0, True), DOT)
    X11 = _unit_lower_inverse(_decay_block(kk11, b1, s1, s1, G1, G1, True), DOT)
    L10 = _decay_block(kk10, b1, s1, s0, G1, G0, False)
    X10 = -tl.dot(X11, tl.dot(L10, X00, input_precision=DOT), input_precision=DOT)

    Xh = X + hv * BT + cs * stride_x_t
    zeros = tl.zeros([H2, H2], dtype=X.dtype.element_ty)
    tl.store(Xh + r0[:, None] * stride_x_t + r0[None, :], X00.to(X.dtype.element_ty), mask=m0[:, None])
    tl.store(Xh + r0[:, None] * stride_x_t + r1[None, :], zeros, mask=m0[:, None])
    tl.store(Xh + r1[:, None] * stride_x_t + r0[None, :], X10.to(X.dtype.element_ty), mask=m1[:, None])
    tl.store(Xh + r1[:, None] * stride_x_t + r1[None, :], X11.to(X.dtype.element_ty), mask=m1[:, None])
    r = hv + cs * stride_r_t
    tl.store(G + r + r0 * stride_r_t, G0, mask=m0)
    tl.store(G + r + r1 * stride_r_t, G1, mask=m1)
    tl.store(ks + r + r0 * stride_r_t, s0, mask=m0)
    tl.store(ks + r + r1 * stride_r_t, s1, mask=m1)


@triton.jit
def _chunk_wy_kernel(
    q, k, v, beta, cu_seqlens, state_indices, X, G, ks, w, u, A, qd,
    scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_b_t,
    stride_x_t, stride_w_t, stride_u_t, stride_a_t, stride_r_t,
    N, RATIO,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, BT: tl.constexpr,
    LOG_N: tl.constexpr, L2NORM: tl.constexpr, DOT: tl.constexpr,
):
    """w = X (beta exp(G) ks k), u = X (beta v), A and qd of one (chunk, value head); X's dtype sets the
    products' operands (bf16 for bf16 inputs, as fla)."""
    hv = tl.program_id(0)
    cs, end = _chunk_start(cu_seqlens, state_indices, tl.program_id(1), N, BT, LOG_N)
    if cs >= end:
        return
    t = tl.arange(0, BT)
    rmask = t < end - cs
    cols_k = tl.arange(0, BK)
    cols_v = tl.arange(0, BVF)
    kmask = rmask[:, None] & (cols_k < K)[None, :]
    vmask = rmask[:, None] & (cols_v < V)[None, :]
    hk = hv // RATIO
    Xc = tl.load(X + hv * BT + cs * stride_x_t + (t[:, None] * stride_x_t + t[None, :]), mask=rmask[:, None],
                 other=0.0)
    kr = tl.load(k + hk * stride_k_h + cs * stride_k_t + (t[:, None] * stride_k_t + cols_k[None, :]), mask=kmask,
                 other=0.0)
    vr = tl.load(v + hv * stride_v_h + cs * stride_v_t + (t[:, None] * stride_v_t + cols_v[None, :]), mask=vmask,
                 other=0.0)
    qr = tl.load(q + hk * stride_q_h + cs * stride_q_t + (t[:, None] * stride_q_t + cols_k[None, :]), mask=kmask,
                 other=0.0)
    r = hv + cs * stride_r_t + t * stride_r_t
    bc = tl.load(beta + cs * stride_b_t + (t * stride_b_t + hv), mask=rmask, other=0.0).to(tl.float32)
    Gc = tl.load(G + r, mask=rmask, other=0.0)
    ksc = tl.load(ks + r, mask=rmask, other=0.0)
    qsc = _row_scale(qr, L2NORM) * scale
    wc = tl.dot(Xc, (kr * (bc * tl.exp(Gc) * ksc)[:, None]).to(Xc.dtype), input_precision=DOT)
    tl.store(w + hv * K + cs * stride_w_t + (t[:, None] * stride_w_t + cols_k[None, :]), wc.to(w.dtype.element_ty),
             mask=kmask)
    uc = tl.dot(Xc, (vr * bc[:, None]).to(Xc.dtype), input_precision=DOT)
    tl.store(u + hv * V + cs * stride_u_t + (t[:, None] * stride_u_t + cols_v[None, :]), uc.to(u.dtype.element_ty),
             mask=vmask)
    causal = t[:, None] >= t[None, :]
    qk = tl.dot(qr, tl.trans(kr), input_precision=DOT)
    Ac = tl.where(causal, qk * (qsc[:, None] * ksc[None, :]) * tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], 0.0)),
                  0.0)
    tl.store(A + hv * BT + cs * stride_a_t + (t[:, None] * stride_a_t + t[None, :]), Ac.to(A.dtype.element_ty),
             mask=rmask[:, None])
    tl.store(qd + r, qsc * tl.exp(Gc), mask=rmask)


@triton.jit
def _merge_level(X, L, t, S: tl.constexpr, DOT: tl.constexpr):
    """(I + L)^-1 over diagonal blocks of 2S rows, from X, the one over blocks of S rows."""
    same = (t[:, None] // (2 * S)) == (t[None, :] // (2 * S))
    off = (t[:, None] // S) != (t[None, :] // S)
    C = tl.where(same & off, L, 0.0)
    return X - tl.dot(tl.dot(X, C, input_precision=DOT), X, input_precision=DOT)


@triton.jit
def _chunk_prepare_kernel(
    q, k, v, g, beta, cu_seqlens, state_indices, w, u, A, G, ks, qd,
    scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_g_t, stride_b_t,
    stride_w_t, stride_u_t, stride_a_t, stride_r_t,
    N, RATIO,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, BT: tl.constexpr,
    LOG_N: tl.constexpr, L2NORM: tl.constexpr, DOT: tl.constexpr,
):
    """w, u, A, G, ks, qd of one (chunk, value head) in one program, X by 64 x 64 doubling; rows past the
    sequence's end are left alone. The path for fp32 inputs and small head dims (see _prepare)."""
    tl.static_assert(BT == 64, "the doubling below builds 64-row inverses")
    hv = tl.program_id(0)
    chunk = tl.program_id(1)
    n = _find_sequence(cu_seqlens, chunk, N, BT, LOG_N)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    cs = start + (chunk - start // BT - n) * BT
    if cs >= end:
        return
    if tl.load(state_indices + n) < 0:
        return
    cs = cs.to(tl.int64)
    t = tl.arange(0, BT)
    rmask = t < end - cs
    cols_k = tl.arange(0, BK)
    cols_v = tl.arange(0, BVF)
    kmask = rmask[:, None] & (cols_k < K)[None, :]
    vmask = rmask[:, None] & (cols_v < V)[None, :]
    hk = hv // RATIO
    kr = tl.load(k + hk * stride_k_h + cs * stride_k_t + (t[:, None] * stride_k_t + cols_k[None, :]), mask=kmask,
                 other=0.0)
    qr = tl.load(q + hk * stride_q_h + cs * stride_q_t + (t[:, None] * stride_q_t + cols_k[None, :]), mask=kmask,
                 other=0.0)
    vr = tl.load(v + hv * stride_v_h + cs * stride_v_t + (t[:, None] * stride_v_t + cols_v[None, :]), mask=vmask,
                 other=0.0)
    gc = tl.load(g + cs * stride_g_t + (t * stride_g_t + hv), mask=rmask, other=0.0).to(tl.float32)
    bc = tl.load(beta + cs * stride_b_t + (t * stride_b_t + hv), mask=rmask, other=0.0).to(tl.float32)
    Gc = tl.cumsum(gc, 0)  # rows past the end add 0, so they repeat G_last
    ksc = _row_scale(kr, L2NORM)
    qsc = _row_scale(qr, L2NORM) * scale
    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], 0.0))

    kk = tl.dot(kr, tl.trans(kr), input_precision=DOT)
    L = tl.where(t[:, None] > t[None, :], kk * ((bc * ksc)[:, None] * ksc[None, :]) * decay, 0.0)
    X = (t[:, None] == t[None, :]).to(tl.float32) - tl.where((t[:, None] // 2) == (t[None, :] // 2), L, 0.0)
    X = _merge_level(X, L, t, 2, DOT)
    X = _merge_level(X, L, t, 4, DOT)
    X = _merge_level(X, L, t, 8, DOT)
    X = _merge_level(X, L, t, 16, DOT)
    X = _merge_level(X, L, t, 32, DOT)
    wc = tl.dot(X, kr.to(tl.float32) * (bc * tl.exp(Gc) * ksc)[:, None], input_precision=DOT)
    uc = tl.dot(X, vr.to(tl.float32) * bc[:, None], input_precision=DOT)
    qk = tl.dot(qr, tl.trans(kr), input_precision=DOT)
    Ac = tl.where(causal, qk * (qsc[:, None] * ksc[None, :]) * decay, 0.0)

    tl.store(w + hv * K + cs * stride_w_t + (t[:, None] * stride_w_t + cols_k[None, :]), wc.to(w.dtype.element_ty),
             mask=kmask)
    tl.store(u + hv * V + cs * stride_u_t + (t[:, None] * stride_u_t + cols_v[None, :]), uc.to(u.dtype.element_ty),
             mask=vmask)
    tl.store(A + hv * BT + cs * stride_a_t + (t[:, None] * stride_a_t + t[None, :]), Ac.to(A.dtype.element_ty),
             mask=rmask[:, None])
    r = hv + cs * stride_r_t + t * stride_r_t
    tl.store(G + r, Gc, mask=rmask)
    tl.store(ks + r, ksc, mask=rmask)
    tl.store(qd + r, qsc * tl.exp(Gc), mask=rmask)


def chunk_prepare(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor,  # [T, HV] fp32 log-decay
    beta: torch.Tensor,  # [T, HV]
    cu_seqlens: torch.Tensor,  # [N+1]
    state_indices: torch.Tensor,  # [N] PAD (<0) sequences are skipped
    scale: float,
    use_qk_l2norm: bool = True,
    split: bool | None = None,
    solve_warps: int | None = None,
    wy_warps: int | None = None,
):
    """-> w [T, HV, K], u [T, HV, V], A [T, HV, BT] in the input dtypes; G, ks, qd [T, HV] fp32.

    16-bit inputs with K >= 64 take two launches (X by 32-row halves, then the WY products), measured on H100;
    fp32 inputs and small head dims take the one-launch 64-row doubling, the path the GPU tests have passed at
    those shapes (the split path's fp32 / small-K builds gave wrong results there and are not used until they
    pass them). `split` overrides the choice."""
    T, H, K = q.shape
    HV, V = v.shape[1:]
    N = state_indices.shape[0]
    BK, BVF = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    dot, log_n = _dot_precision(q.dtype), _log_n(N)
    if split is None:
        split = q.dtype != torch.float32 and K >= 64
    elif split and q.is_cuda and (q.dtype == torch.float32 or K < 64):
        raise ValueError(f"the split prepare kernels are not built right on CUDA for {q.dtype} inputs with K = {K} "
                         f"(an H100 run gave relative errors of 0.97 at K = 16 in fp32, then an illegal memory access, "
                         f"and an H200 run the illegal access): use the one-launch kernel (split=False) there")
    w = _empty_output(k, shape=(T, HV, K))
    u = _empty_output(v, shape=(T, HV, V))
    A = _empty_output(q, shape=(T, HV, BT))
    G, ks, qd = (_empty_output(g, shape=(T, HV), dtype=torch.float32) for _ in range(3))
    if not split:
        _chunk_prepare_kernel[(HV, T // BT + N)](
            q, k, v, g, beta, cu_seqlens, state_indices, w, u, A, G, ks, qd,
            scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0),
            w.stride(0), u.stride(0), A.stride(0), G.stride(0),
            N, HV // H,
            K=K, V=V, BK=BK, BVF=BVF, BT=BT, LOG_N=log_n, L2NORM=use_qk_l2norm, DOT=dot,
            num_warps=4,
        )
        return w, u, A, G, ks, qd
    X = _empty_output(k, shape=(T, HV, BT))
    _chunk_solve_kernel[(HV, T // BT + N)](
        k, g, beta, cu_seqlens, state_indices, X, G, ks,
        k.stride(0), k.stride(1), g.stride(0), beta.stride(0), X.stride(0), G.stride(0),
        N, HV // H,
        K=K, BK=BK, BKC=min(BK, 32), BT=BT, LOG_N=log_n, L2NORM=use_qk_l2norm, DOT=dot,
        num_warps=solve_warps or 2,
    )
    _chunk_wy_kernel[(HV, T // BT + N)](
        q, k, v, beta, cu_seqlens, state_indices, X, G, ks, w, u, A, qd,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), beta.stride(0),
        X.stride(0), w.stride(0), u.stride(0), A.stride(0), G.stride(0),
        N, HV // H,
        K=K, V=V, BK=BK, BVF=BVF, BT=BT, LOG_N=log_n, L2NORM=use_qk_l2norm, DOT=dot,
        num_warps=wy_warps or 8,
    )
    return w, u, A, G, ks, qd
