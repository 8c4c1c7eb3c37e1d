"""Gated delta rule, torch reference.

Recurrence per value head, in fp32:  S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q
with q, k l2-normalised and q scaled by K^-1/2. Key heads are shared by HV / H consecutive value heads.
State pools are owned by the caller: `ssm_states` is `[G, 1+k, HV, K, V]` (one group of 1+k slots
per sequence, see worker.model.context.GDNMetadata).
"""

import torch
import torch.nn.functional as F


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """a, b: [T, HV] -> g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), both fp32 [T, HV]."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, scale, use_qk_l2norm):
    """Cast to fp32, normalise, and expand key heads to value heads: [..., H, K] -> [..., HV, K]."""
    q, k, v = q.float(), k.float(), v.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (scale if scale is not None else q.shape[-1] ** -0.5)
    ratio = v.shape[-2] // q.shape[-2]
    if ratio > 1:
        q = q.repeat_interleave(ratio, dim=-2)
        k = k.repeat_interleave(ratio, dim=-2)
    return q, k, v


def _operands(k, v, g, beta):
    """Per-token operands of the update, shaped for it: k [..., HV, K], v [..., HV, V], g and beta [..., HV] ->
    k rows [..., HV, 1, K], v rows [..., HV, 1, V], exp(g) [..., HV, 1, 1], beta k columns [..., HV, K, 1]."""
    beta = beta.float()[..., None]
    return k.unsqueeze(-2), v.unsqueeze(-2), g.float().exp()[..., None, None], (beta * k).unsqueeze(-1)


def _update(state, k_row, v_row, decay, beta_k, out=None):
    """One token's update for a batch of states [N, HV, K, V], its operands as `_operands` shapes them:
    S <- exp(g) S;  S <- S + (beta k) (v - S^T k)^T. Written into `out` if given."""
    state = state * decay
    return torch.addcmul(state, beta_k, v_row - k_row @ state, out=out)


def _read_out(state, q_t):
    """o = S^T q: state [..., HV, K, V], q_t [..., HV, K] -> [..., HV, V]."""
    return (q_t.unsqueeze(-2) @ state).squeeze(-2)


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
    out = torch.zeros_like(v)
    qf, kf, vf = _prepare(q, k, v, scale, use_qk_l2norm)
    bounds = cu_seqlens.tolist()
    groups, accepted, has_init = state_indices.tolist(), num_accepted.tolist(), has_initial_state.tolist()
    for n in range(len(bounds) - 1):
        start, end = bounds[n], bounds[n + 1]
        if groups[n] < 0 or end == start:
            continue
        if has_init[n]:
            state = ssm_states[groups[n], accepted[n] - 1].float().unsqueeze(0)
        else:
            state = ssm_states.new_zeros((1, *ssm_states.shape[2:]), dtype=torch.float32)
        operands = _operands(kf[start:end, None], vf[start:end, None], g[start:end, None], beta[start:end, None])
        for t in range(end - start):
            state = _update(state, *(x[t] for x in operands))
            out[start + t] = _read_out(state, qf[start + t : start + t + 1])[0].to(out.dtype)
        ssm_states[groups[n], 0] = state[0].to(ssm_states.dtype)
    return out


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
    out = torch.zeros_like(v)
    valid = (state_indices >= 0).nonzero().flatten()
    if valid.numel() == 0:
        return out
    groups = state_indices[valid]
    qf, kf, vf = _prepare(q[valid], k[valid], v[valid], scale, use_qk_l2norm)
    operands = _operands(kf, vf, g[valid], beta[valid])
    state = ssm_states[groups, num_accepted[valid] - 1].float()
    states = state.new_empty(state.shape[0], q.shape[1], *state.shape[1:])  # [n, Q, HV, K, V]
    # Only the update is sequential, each state written into its place (no stack of them after: one copy
    # fewer); the read-outs and the writes go in one op each.
    for j in range(q.shape[1]):
        state = _update(state, *(x[:, j] for x in operands), out=states[:, j])
    out[valid] = _read_out(states, qf).to(out.dtype)
    ssm_states[groups, : q.shape[1]] = states.to(ssm_states.dtype)
    return out


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
    """gdn_gating, then fused_recurrent_gated_delta_rule (the Triton kernel does both in one launch)."""
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule(q, k, v, g, beta, ssm_states, state_indices, num_accepted, scale,
                                            use_qk_l2norm)
