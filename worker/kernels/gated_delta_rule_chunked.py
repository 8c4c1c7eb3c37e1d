"""Chunked gated delta rule in stages, torch reference of worker.kernels.triton_gated_delta_rule_chunked.

Within a chunk of BT tokens of one sequence and value head, with G the cumulative log-decay from the
chunk start, q and k l2-normalised (q also scaled) and S the state before the chunk:

    L  = strictly_lower(beta_t exp(G_t - G_s) k_t.k_s)          X = (I + L)^-1
    w  = X (beta exp(G) k)      u = X (beta v)                     (the WY representation)
    A  = lower(q_t.k_s exp(G_t - G_s))                              (intra-chunk attention, s <= t)
    v_new = u - w S
    o  = exp(G) (q S) + A v_new
    S' = exp(G_last) S + (exp(G_last - G) k)^T v_new

`chunk_prepare` computes everything that does not depend on S (all chunks independent);
`chunk_states` walks the chunks of each sequence in order; `chunk_output` needs only the state before
each chunk and v_new. Chunks are numbered as in the Triton kernels: sequence n's chunk j is
cu_seqlens[n] // BT + n + j, so T // BT + N numbers cover every chunk of a batch.
"""

import torch

BT = 64


def num_chunk_slots(T: int, N: int) -> int:
    return T // BT + N


def _chunks(cu_seqlens, state_indices):
    """(sequence, first chunk number, start, end) of every chunk of every non-PAD sequence."""
    bounds, groups = cu_seqlens.tolist(), state_indices.tolist()
    for n in range(len(groups)):
        if groups[n] < 0:
            continue
        for j, cs in enumerate(range(bounds[n], bounds[n + 1], BT)):
            yield n, bounds[n] // BT + n + j, cs, min(cs + BT, bounds[n + 1])


def chunk_prepare(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor,  # [T, HV] fp32 log-decay
    beta: torch.Tensor,  # [T, HV]
    cu_seqlens: torch.Tensor,  # [N+1]
    state_indices: torch.Tensor,  # [N] PAD (<0) sequences are skipped (their rows stay NaN)
    scale: float,
    use_qk_l2norm: bool = True,
):
    """-> w [T, HV, K], u [T, HV, V], A [T, HV, BT] (row t, column s - chunk start), G, ks, qd [T, HV], all fp32.

    ks is k's l2 scale (1 without normalisation) and qd = scale * q's l2 scale * exp(G)."""
    T, H, K = q.shape
    HV, V = v.shape[1:]
    ratio = HV // H
    qf, kf, vf = q.double().cpu(), k.double().cpu(), v.double().cpu()
    if use_qk_l2norm:
        qscale, kscale = torch.rsqrt((qf * qf).sum(-1) + 1e-6), torch.rsqrt((kf * kf).sum(-1) + 1e-6)
    else:
        qscale, kscale = torch.ones(T, H, dtype=torch.float64), torch.ones(T, H, dtype=torch.float64)
    qn = (qf * qscale[..., None]).repeat_interleave(ratio, 1)  # [T, HV, K]
    kn = (kf * kscale[..., None]).repeat_interleave(ratio, 1)
    qscale, kscale = qscale.repeat_interleave(ratio, 1) * scale, kscale.repeat_interleave(ratio, 1)
    nan = float("nan")
    w = torch.full((T, HV, K), nan, dtype=torch.float64)
    u = torch.full((T, HV, V), nan, dtype=torch.float64)
    A = torch.full((T, HV, BT), nan, dtype=torch.float64)
    G = torch.full((T, HV), nan, dtype=torch.float64)
    ks = torch.full((T, HV), nan, dtype=torch.float64)
    qd = torch.full((T, HV), nan, dtype=torch.float64)
    gf, bf = g.double().cpu(), beta.double().cpu()
    for _, _, cs, ce in _chunks(cu_seqlens.cpu(), state_indices.cpu()):
        c = ce - cs
        for hv in range(HV):
            Gc = gf[cs:ce, hv].cumsum(0)
            decay = (Gc[:, None] - Gc[None, :]).tril().exp().tril()
            kc, qc, b = kn[cs:ce, hv], qn[cs:ce, hv], bf[cs:ce, hv]
            L = (b[:, None] * decay * (kc @ kc.T)).tril(-1)
            X = torch.linalg.solve_triangular(torch.eye(c, dtype=torch.float64) + L, torch.eye(c, dtype=torch.float64),
                                              upper=False, unitriangular=True)
            w[cs:ce, hv] = X @ ((b * Gc.exp())[:, None] * kc)
            u[cs:ce, hv] = X @ (b[:, None] * vf[cs:ce, hv])
            A[cs:ce, hv] = 0.0
            A[cs:ce, hv, :c] = (decay * (qc @ kc.T) * scale).tril()
            G[cs:ce, hv] = Gc
            ks[cs:ce, hv] = kscale[cs:ce, hv]
            qd[cs:ce, hv] = qscale[cs:ce, hv] * Gc.exp()
    dev = q.device
    return tuple(x.float().to(dev) for x in (w, u, A, G, ks, qd))


def chunk_states(
    k: torch.Tensor,  # [T, H, K] as given (not normalised)
    w: torch.Tensor,  # [T, HV, K]
    u: torch.Tensor,  # [T, HV, V]
    G: torch.Tensor,  # [T, HV]
    ks: torch.Tensor,  # [T, HV]
    cu_seqlens: torch.Tensor,  # [N+1]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    state_indices: torch.Tensor,  # [N]
    num_accepted: torch.Tensor,  # [N]
    has_initial_state: torch.Tensor,  # [N]
):
    """-> h [T // BT + N, HV, K, V] (the state before each chunk), v_new [T, HV, V]; final states to slot 0."""
    T, H, K = k.shape
    HV, V = u.shape[1:]
    ratio = HV // H
    N = state_indices.shape[0]
    h_all = torch.full((num_chunk_slots(T, N), HV, K, V), float("nan"), dtype=torch.float32, device=k.device)
    v_new = torch.full_like(u, float("nan"))
    kf = k.float().repeat_interleave(ratio, 1)
    groups, accepted, has_init = state_indices.tolist(), num_accepted.tolist(), has_initial_state.tolist()
    state = {}
    for n, chunk, cs, ce in _chunks(cu_seqlens, state_indices):
        if n not in state:
            state[n] = (ssm_states[groups[n], accepted[n] - 1].float() if has_init[n]
                        else torch.zeros(HV, K, V, device=k.device))
        S = state[n]
        h_all[chunk] = S
        vn = u[cs:ce].transpose(0, 1) - w[cs:ce].transpose(0, 1) @ S  # [HV, c, V]
        v_new[cs:ce] = vn.transpose(0, 1)
        Gc = G[cs:ce].transpose(0, 1)  # [HV, c]
        kd = kf[cs:ce].transpose(0, 1) * (ks[cs:ce].transpose(0, 1) * (Gc[:, -1:] - Gc).exp())[..., None]
        state[n] = S * Gc[:, -1].exp()[:, None, None] + kd.transpose(1, 2) @ vn
    for n, S in state.items():
        ssm_states[groups[n], 0] = S.to(ssm_states.dtype)
    return h_all, v_new


def chunk_output(
    q: torch.Tensor,  # [T, H, K] as given
    A: torch.Tensor,  # [T, HV, BT]
    qd: torch.Tensor,  # [T, HV]
    h: torch.Tensor,  # [T // BT + N, HV, K, V]
    v_new: torch.Tensor,  # [T, HV, V]
    cu_seqlens: torch.Tensor,  # [N+1]
    state_indices: torch.Tensor,  # [N] PAD sequences' rows are zeros
) -> torch.Tensor:  # [T, HV, V] fp32
    T, H, K = q.shape
    HV = A.shape[1]
    qf = q.float().repeat_interleave(HV // H, 1)
    out = torch.zeros(T, HV, v_new.shape[-1], device=q.device)
    for _, chunk, cs, ce in _chunks(cu_seqlens, state_indices):
        c = ce - cs
        inter = (qf[cs:ce] * qd[cs:ce, :, None]).transpose(0, 1) @ h[chunk]  # [HV, c, V]
        intra = A[cs:ce, :, :c].transpose(0, 1) @ v_new[cs:ce].transpose(0, 1)
        out[cs:ce] = (inter + intra).transpose(0, 1)
    return out
