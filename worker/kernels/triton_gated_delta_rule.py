"""Gated delta rule, Triton kernels (the torch reference is worker.kernels.gated_delta_rule).

Prefill (`chunk_gated_delta_rule`) runs the chunked form in worker.kernels.triton_gated_delta_rule_chunked:
a parallel launch for everything within a chunk that does not depend on the state (the WY
representation w, u of the delta rule and the intra-chunk attention), a sequential launch per
(V tile, value head, sequence) for the state, and a parallel launch for the outputs.

Decode and verify (`fused_recurrent_gated_delta_rule`) step token by token, one program per
(sequence, value head, V tile), reading slot num_accepted-1 once and writing every slot j.

No launch path reads device memory on the host, so both can be captured in CUDA graphs.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule_chunked import _num_sms
from worker.kernels.triton_gated_delta_rule_chunked import chunk_gated_delta_rule_fwd as _chunk_gated_delta_rule_fwd
from worker.kernels.triton_gated_delta_rule_wy import _find_sequence  # noqa: F401 (the conv kernels import it here)


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


# ---------------------------------------------------------------- decode / verify


@triton.jit
def _fused_recurrent_kernel(
    q, k, v, g, beta, o, ssm_states, state_indices, num_accepted, A_log, dt_bias,
    scale,
    stride_q_n, stride_q_t, stride_q_h, stride_k_n, stride_k_t, stride_k_h,
    stride_v_n, stride_v_t, stride_v_h, stride_o_n, stride_o_t, stride_o_h,
    stride_g_n, stride_g_t, stride_b_n, stride_b_t, stride_s_g, stride_s_slot, stride_s_h,
    RATIO,
    Q: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2NORM: tl.constexpr, GATING: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (V tile, value head, sequence) of a decode / verify step. With GATING, g and beta hold the
    projections a and b, and the gating (gdn_gating) is computed here."""
    pdl_enter(PDL)
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
    if GATING:
        A = tl.load(A_log + hv).to(tl.float32)
        dt = tl.load(dt_bias + hv).to(tl.float32)
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
        if GATING:
            gj, bj = _gating(gj, bj, A, dt)
        h = h * tl.exp(gj)
        delta = bj * (vj - tl.sum(h * kj[:, None], 0))
        h = h + kj[:, None] * delta[None, :]
        tl.store(o_ptr + j * stride_o_t, tl.sum(h * qj[:, None], 0).to(o.dtype.element_ty), mask=vmask)
        tl.store(s_base + j * stride_s_slot, h.to(ssm_states.dtype.element_ty), mask=hmask)


def _fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, ssm_states, state_indices, num_accepted, scale,
                                          use_qk_l2norm, BV=None, num_warps=None, num_stages=None, gating=None):
    """Launcher: allocates the output, picks tiles. BV / num_warps / num_stages override the choice.
    gating = (A_log, dt_bias): g and beta are the projections a and b, gated in the kernel."""
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
        q, k, v, g, beta, out, ssm_states, state_indices, num_accepted, *(gating or (g, g)),
        scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *g.stride()[:2], *beta.stride()[:2], *ssm_states.stride()[:3],
        HV // H,
        Q=Q, K=K, V=V, BK=BK, BV=BV, L2NORM=use_qk_l2norm, GATING=gating is not None,
        num_warps=num_warps or 1, num_stages=num_stages or 2, **pdl_launch(q.device)
    )
    return out


# ---------------------------------------------------------------- gating


@triton.jit
def _gating(a, b, A_log, dt_bias):
    """fp32 (a, b, A_log, dt_bias) -> g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)."""
    x = a + dt_bias
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # torch's threshold
    return -tl.exp(A_log) * softplus, tl.sigmoid(b)


@triton.jit
def _gdn_gating_kernel(a, b, A_log, dt_bias, g, beta, stride_a_t, stride_b_t, total, HV, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    t = i // HV
    h = i % HV
    x = tl.load(a + t * stride_a_t + h, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(b + t * stride_b_t + h, mask=mask, other=0.0).to(tl.float32)
    A = tl.load(A_log + h, mask=mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_bias + h, mask=mask, other=0.0).to(tl.float32)
    gate, bt = _gating(x, y, A, dt)
    tl.store(g + i, gate, mask=mask)
    tl.store(beta + i, bt, mask=mask)


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
    gating: tuple[torch.Tensor, torch.Tensor] | None = None,  # (A_log, dt_bias): g, beta are a, b (the fused op)
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
                                                 K ** -0.5 if scale is None else scale, use_qk_l2norm, gating=gating)


def fused_gating_recurrent_gated_delta_rule(
    q: torch.Tensor,  # [N, Q, H, K] with Q = 1 + k
    k: torch.Tensor,  # [N, Q, H, K]
    v: torch.Tensor,  # [N, Q, HV, V]
    a: torch.Tensor,  # [N, Q, HV] the decay projection
    b: torch.Tensor,  # [N, Q, HV] the beta projection
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    state_indices: torch.Tensor,  # [N] slot group, PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N] initial state is slot num_accepted-1 of the group
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:  # [N, Q, HV, V]
    """gdn_gating and fused_recurrent_gated_delta_rule in one launch: the gating is computed per token
    by the programs that use it, with the same arithmetic as the gating kernel."""
    _check(a.dim() == 3 and a.shape == b.shape, f"a and b must be [N, Q, HV], got {tuple(a.shape)}, {tuple(b.shape)}")
    HV = a.shape[2]
    _check(A_log.shape == (HV,) and dt_bias.shape == (HV,), f"A_log and dt_bias must be [{HV}]")
    return fused_recurrent_gated_delta_rule(q, k, v, a, b, ssm_states, state_indices, num_accepted, scale,
                                            use_qk_l2norm, gating=(A_log, dt_bias))
