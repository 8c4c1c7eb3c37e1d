"""Chunked gated delta rule (prefill), Triton; the torch reference of each stage is in
worker.kernels.gated_delta_rule_chunked, which also gives the algebra.

1. `chunk_prepare` (worker.kernels.triton_gated_delta_rule_wy), all chunks in parallel: the WY representation
   w, u of the delta rule within each chunk, the intra-chunk attention A and the row scales G, ks, qd.
2. `_chunk_state_kernel`, one program per (V tile, value head, sequence): the only sequential part,
   v_new = u - w S and S' = exp(G_last) S + (exp(G_last - G) k)^T v_new with the fp32 state in registers.
   It writes the state before each chunk and v_new, or (FUSED_OUTPUT) the output itself.
3. `_chunk_output_kernel`, one program per (chunk, value head, V tile): o = qd (q S) + A v_new.

Sequence n's chunks are numbered from cu_seqlens[n] // BT + n, so grids of T // BT + N chunks need no
host-side chunk table and nothing is read back on the host (the launches can be captured in CUDA graphs).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from worker.kernels.triton_gated_delta_rule_wy import (BT, _dot_precision, _find_sequence, _log_n,
                                                     chunk_prepare)


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


@triton.jit
def _state_step(qh, kh, wh, uh, Ah, Gh, ksh, qdh, oh, h_out, vnh, h, cs, end, chunk, cols_k, cols_v,
                stride_q_t, stride_k_t, stride_o_t, stride_w_t, stride_u_t, stride_a_t, stride_r_t, stride_h_c,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, FUSED_OUTPUT: tl.constexpr, DOT: tl.constexpr):
    """The state after one chunk from the state h before it; writes h and v_new, or the chunk's output."""
    t = tl.arange(0, BT)
    rmask = t < end - cs
    kmask = rmask[:, None] & (cols_k < K)[None, :]
    vmask = rmask[:, None] & (cols_v < V)[None, :]
    wc = tl.load(wh + cs * stride_w_t + (t[:, None] * stride_w_t + cols_k[None, :]), mask=kmask, other=0.0)
    uc = tl.load(uh + cs * stride_u_t + (t[:, None] * stride_u_t + cols_v[None, :]), mask=vmask,
                 other=0.0).to(tl.float32)
    kr = tl.load(kh + cs * stride_k_t + (t[:, None] * stride_k_t + cols_k[None, :]), mask=kmask, other=0.0)
    Gc = tl.load(Gh + cs * stride_r_t + t * stride_r_t, mask=rmask, other=0.0)
    ksc = tl.load(ksh + cs * stride_r_t + t * stride_r_t, mask=rmask, other=0.0)
    G_last = tl.load(Gh + (tl.minimum(cs + BT, end) - 1) * stride_r_t)
    hb = h.to(wc.dtype)
    vn = uc - tl.dot(wc, hb, input_precision=DOT)
    if FUSED_OUTPUT:
        qr = tl.load(qh + cs * stride_q_t + (t[:, None] * stride_q_t + cols_k[None, :]), mask=kmask, other=0.0)
        Ac = tl.load(Ah + cs * stride_a_t + (t[:, None] * stride_a_t + t[None, :]), mask=rmask[:, None], other=0.0)
        qdc = tl.load(qdh + cs * stride_r_t + t * stride_r_t, mask=rmask, other=0.0)
        oc = qdc[:, None] * tl.dot(qr, hb, input_precision=DOT) + tl.dot(Ac, vn.to(Ac.dtype), input_precision=DOT)
        tl.store(oh + cs * stride_o_t + (t[:, None] * stride_o_t + cols_v[None, :]), oc.to(oh.dtype.element_ty),
                 mask=vmask)
    else:
        hmask = (cols_k < K)[:, None] & (cols_v < V)[None, :]
        tl.store(h_out + chunk * stride_h_c + (cols_k[:, None] * V + cols_v[None, :]), hb, mask=hmask)
        tl.store(vnh + cs * stride_u_t + (t[:, None] * stride_u_t + cols_v[None, :]), vn.to(vnh.dtype.element_ty),
                 mask=vmask)
    kd = (vn * (tl.exp(G_last - Gc) * ksc)[:, None]).to(kr.dtype)
    return h * tl.exp(G_last) + tl.dot(tl.trans(kr), kd, input_precision=DOT)


@triton.jit
def _chunk_state_kernel(
    q, k, w, u, A, G, ks, qd, o, h_out, v_new, cu_seqlens, ssm_states, state_indices, num_accepted,
    has_initial_state,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_o_t, stride_o_h, stride_s_g, stride_s_slot, stride_s_h,
    stride_w_t, stride_u_t, stride_a_t, stride_r_t, stride_h_c,
    RATIO,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    FUSED_OUTPUT: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One (V tile, value head, sequence): walk the chunks in order with the state in registers."""
    vb = tl.program_id(0)
    hv = tl.program_id(1)
    n = tl.program_id(2)
    start = tl.load(cu_seqlens + n).to(tl.int64)
    end = tl.load(cu_seqlens + n + 1).to(tl.int64)
    t = tl.arange(0, BT)
    cols_v = vb * BV + tl.arange(0, BV)
    oh = o + hv * stride_o_h
    group = tl.load(state_indices + n).to(tl.int64)
    if group < 0:  # the reference leaves zeros in a skipped sequence's rows (the output kernel's job otherwise)
        if FUSED_OUTPUT:
            cs = start
            while cs < end:
                rows = cs + t
                zeros = tl.zeros([BT, BV], dtype=o.dtype.element_ty)
                tl.store(oh + rows[:, None] * stride_o_t + cols_v[None, :], zeros,
                         mask=(rows < end)[:, None] & (cols_v < V)[None, :])
                cs += BT
        return
    if end <= start:
        return
    cols_k = tl.arange(0, BK)
    hmask = (cols_k < K)[:, None] & (cols_v < V)[None, :]
    s_base = ssm_states + group * stride_s_g + hv * stride_s_h + cols_k[:, None] * V + cols_v[None, :]
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if tl.load(has_initial_state + n):
        slot = tl.load(num_accepted + n).to(tl.int64) - 1
        h = tl.load(s_base + slot * stride_s_slot, mask=hmask, other=0.0).to(tl.float32)
    qh = q + (hv // RATIO) * stride_q_h
    kh = k + (hv // RATIO) * stride_k_h
    wh, uh, vnh, Ah = w + hv * K, u + hv * V, v_new + hv * V, A + hv * BT
    Gh, ksh, qdh = G + hv, ks + hv, qd + hv
    h_out += hv * (K * V)
    first = start // BT + n  # this sequence's first chunk number
    if INTERPRET:  # the interpreter cannot index a range by loaded bounds
        cs = start
        while cs < end:
            h = _state_step(qh, kh, wh, uh, Ah, Gh, ksh, qdh, oh, h_out, vnh, h, cs, end, first + (cs - start) // BT,
                            cols_k, cols_v, stride_q_t, stride_k_t, stride_o_t, stride_w_t, stride_u_t, stride_a_t,
                            stride_r_t, stride_h_c, K, V, BT, FUSED_OUTPUT, DOT)
            cs += BT
    else:
        for cs in range(start, end, BT):
            h = _state_step(qh, kh, wh, uh, Ah, Gh, ksh, qdh, oh, h_out, vnh, h, cs, end, first + (cs - start) // BT,
                            cols_k, cols_v, stride_q_t, stride_k_t, stride_o_t, stride_w_t, stride_u_t, stride_a_t,
                            stride_r_t, stride_h_c, K, V, BT, FUSED_OUTPUT, DOT)
    tl.store(s_base, h.to(ssm_states.dtype.element_ty), mask=hmask)


@triton.jit
def _chunk_output_kernel(
    q, A, qd, h, v_new, o, cu_seqlens, state_indices,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_u_t, stride_a_t, stride_r_t, stride_h_c,
    N, RATIO,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    LOG_N: tl.constexpr, DOT: tl.constexpr,
):
    """o = qd (q S) + A v_new for one (chunk, value head, V tile); zeros for a PAD sequence."""
    NV: tl.constexpr = (V + BV - 1) // BV
    hv = tl.program_id(0) // NV
    vb = tl.program_id(0) % NV
    chunk = tl.program_id(1)
    n = _find_sequence(cu_seqlens, chunk, N, BT, LOG_N)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    cs = start + (chunk - start // BT - n) * BT
    if cs >= end:
        return
    cs = cs.to(tl.int64)
    t = tl.arange(0, BT)
    rmask = t < end - cs
    cols_k = tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    vmask = rmask[:, None] & (cols_v < V)[None, :]
    o_ptr = o + hv * stride_o_h + cs * stride_o_t + (t[:, None] * stride_o_t + cols_v[None, :])
    if tl.load(state_indices + n) < 0:
        tl.store(o_ptr, tl.zeros([BT, BV], dtype=o.dtype.element_ty), mask=vmask)
        return
    qr = tl.load(q + (hv // RATIO) * stride_q_h + cs * stride_q_t + (t[:, None] * stride_q_t + cols_k[None, :]),
                 mask=rmask[:, None] & (cols_k < K)[None, :], other=0.0)
    hc = tl.load(h + hv * (K * V) + chunk.to(tl.int64) * stride_h_c + (cols_k[:, None] * V + cols_v[None, :]),
                 mask=(cols_k < K)[:, None] & (cols_v < V)[None, :], other=0.0)
    Ac = tl.load(A + hv * BT + cs * stride_a_t + (t[:, None] * stride_a_t + t[None, :]), mask=rmask[:, None], other=0.0)
    vn = tl.load(v_new + hv * V + cs * stride_u_t + (t[:, None] * stride_u_t + cols_v[None, :]), mask=vmask,
                 other=0.0)
    qdc = tl.load(qd + hv + cs * stride_r_t + t * stride_r_t, mask=rmask, other=0.0)
    oc = qdc[:, None] * tl.dot(qr, hc, input_precision=DOT) + tl.dot(Ac, vn, input_precision=DOT)
    tl.store(o_ptr, oc.to(o.dtype.element_ty), mask=vmask)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu_seqlens, ssm_states, state_indices, num_accepted,
                               has_initial_state, scale, use_qk_l2norm, BV=None, num_warps=None, num_stages=None,
                               fused_output=None, split_prepare=None, solve_warps=None, wy_warps=None):
    """Launcher: allocates the output and the intermediates, picks tiles. BV / num_warps / num_stages are the
    sequential kernel's; split_prepare, solve_warps and wy_warps choose the parallel launches before it (see
    chunk_prepare); fused_output computes the output in the sequential kernel instead of a separate launch. None picks
    the measured default (benchmarks/results)."""
    # Triton 3.6 on Hopper: unpipelined (num_stages=1) builds of the sequential kernel read past their shared
    # memory in the tensor-core product with k^T (compute-sanitizer: invalid __shared__ reads; wrong outputs).
    if num_stages is not None and num_stages < 2:
        raise ValueError(f"num_stages must be >= 2 for the chunked prefill, got {num_stages}")
    T, H, K = q.shape
    HV, V = v.shape[1:]
    N = state_indices.shape[0]
    out = _empty_output(v)
    if T == 0 or N == 0:
        return out
    BK = max(16, triton.next_power_of_2(K))
    BVF = max(16, triton.next_power_of_2(V))
    # Measured on H100 (benchmarks/results/gdn_kernels_h100.json): with few (sequence, head) pairs the sequential
    # kernel is bound by each chunk's latency and the re-reads of w and k per V tile, and the outputs are cheaper in
    # their own parallel launch; with many, writing the states and v_new costs more than computing the outputs inline.
    many = N * HV * triton.cdiv(V, 64) >= 2 * _num_sms(q.device)
    if fused_output is None:
        fused_output = many
    if BV is None:
        BV = 64 if many else 32
    BV = min(BV, BVF)
    if num_stages is None:
        num_stages = 2 if many else 3
    dot = _dot_precision(q.dtype)
    w, u, A, G, ks, qd = chunk_prepare(q, k, v, g, beta, cu_seqlens, state_indices, scale, use_qk_l2norm,
                                       split_prepare, solve_warps, wy_warps)
    num_chunks = T // BT + N
    if fused_output:
        h = v_new = out  # not written
    else:
        h = _empty_output(k, shape=(num_chunks, HV, K, V))
        v_new = _empty_output(v, shape=(T, HV, V))
    _chunk_state_kernel[(triton.cdiv(V, BV), HV, N)](
        q, k, w, u, A, G, ks, qd, out, h, v_new, cu_seqlens, ssm_states, state_indices, num_accepted,
        has_initial_state,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2),
        w.stride(0), u.stride(0), A.stride(0), G.stride(0), HV * K * V,
        HV // H,
        K=K, V=V, BK=BK, BV=BV, BT=BT, FUSED_OUTPUT=fused_output, DOT=dot, INTERPRET=_interpreting(),
        num_warps=num_warps or 4, num_stages=num_stages,
    )
    if not fused_output:
        BVO = min(64, BVF)
        _chunk_output_kernel[(HV * triton.cdiv(V, BVO), num_chunks)](
            q, A, qd, h, v_new, out, cu_seqlens, state_indices,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), u.stride(0), A.stride(0), G.stride(0), HV * K * V,
            N, HV // H,
            K=K, V=V, BK=BK, BV=BVO, BT=BT, LOG_N=_log_n(N), DOT=dot,
            num_warps=4,
        )
    return out
