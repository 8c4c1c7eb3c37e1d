"""Sparse mixture of SwiGLU experts, torch references (the source of truth; any device).

A token's experts are its `top_k` routed experts plus, when the block fuses it, the shared expert
as one more slot: its id is `num_experts` (the last expert of the stacked weights) and its weight
`sigmoid(shared gate logit)`. Small batches (decode and verify) sum a token's slots in slot order in fp32,
as the Triton kernels do; larger ones loop over the experts and add in expert order.
"""

import torch
import torch.nn.functional as F


def select_experts(
    router_logits: torch.Tensor,  # [T, E] or, with shared_gate, [T, E + 1] (last column: the shared gate)
    top_k: int,
    renormalize: bool,
    shared_gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, S] fp32, ids [T, S] int64), S = top_k + shared_gate
    """Softmax in fp32 over the routed experts, top-k (ties to the lower id), renormalised if asked."""
    logits = router_logits.float()
    num_experts = logits.shape[-1] - int(shared_gate)
    probs = logits[:, :num_experts].softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if shared_gate:
        weights = torch.cat([weights, logits[:, num_experts:].sigmoid()], dim=-1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], num_experts)], dim=-1)
    return weights, ids


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, S]
    num_experts: int,  # experts of the stacked weights (the shared one included)
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*S (token, slot) pairs by expert, each expert's run padded to block_size.

    -> sorted_ids [max_padded] int32: pair index t*S + s, or T*S for padding;
       expert_ids [max_padded // block_size] int32: the expert of each block, -1 past the used blocks;
       num_padded [1] int32: the used length of sorted_ids.
    max_padded = T*S + min(T*S, E) * (block_size - 1), rounded up to block_size: a bound from the
    token count alone. Pairs keep their order within an expert.
    """
    num_pairs = topk_ids.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    expert_start = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=flat.device) - first_of_expert[sorted_experts]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[expert_start[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_size, device=flat.device)
    expert_end = torch.cumsum(padded, 0)
    expert_ids = torch.searchsorted(expert_end, block_start, right=True).to(torch.int32)
    num_padded = expert_end[-1:].to(torch.int32)
    expert_ids = torch.where(block_start < num_padded, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, num_padded


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    bound = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    return max(block_size, -(-bound // block_size) * block_size)


def fused_moe(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H], gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, S] fp32
    topk_ids: torch.Tensor,  # [T, S]
) -> torch.Tensor:  # [T, H]
    """sum over slots s of topk_weights[t, s] * down(silu(gate(x)) * up(x)) with expert topk_ids[t, s]."""
    if topk_ids.numel() <= PER_PAIR_MAX_PAIRS:
        return _fused_moe_per_pair(hidden_states, w13, w2, topk_weights, topk_ids)
    out = torch.zeros_like(hidden_states)
    inter = w2.shape[-1]
    for expert in topk_ids.unique().tolist():
        token_idx, slot = (topk_ids == expert).nonzero(as_tuple=True)
        x = hidden_states[token_idx]
        gate_up = x @ w13[expert].t()
        y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[expert].t()
        out.index_add_(0, token_idx, (y * topk_weights[token_idx, slot, None]).to(out.dtype))
    return out


# Up to this many (token, slot) pairs (decode and verify steps on the CPU), the pairs run as batched products
# and sum in slot order: no Python loop over the experts.
PER_PAIR_MAX_PAIRS = 64

# torch's CPU bmm multiplies a matrix of fewer multiply-adds than this in its own loop, the rest through BLAS.
# Where BLAS gives each column the same bits whatever the number of columns (not every CPU's does), only where
# both projections of a token go through BLAS does the all-experts path give the gathered path's bits.
_BMM_BLAS_MIN_MACS = 400


def _fused_moe_per_pair(hidden_states, w13, w2, topk_weights, topk_ids):
    tokens, slots = topk_ids.shape
    experts, hidden, inter = w2.shape
    if experts <= topk_ids.numel() and inter * hidden >= _BMM_BLAS_MIN_MACS and w2.device.type == "cpu":
        y = _all_experts(hidden_states, w13, w2, topk_ids)
    else:
        y = _gathered_experts(hidden_states, w13, w2, topk_ids)
    y = (y * topk_weights[..., None]).to(hidden_states.dtype).float()
    out = y[:, 0]
    for s in range(1, slots):  # as the Triton kernels sum: each weighted output rounded, added in fp32 in slot order
        out = out + y[:, s]
    return out.to(hidden_states.dtype)


def _gathered_experts(hidden_states, w13, w2, topk_ids) -> torch.Tensor:  # [T, S, H]
    """Each pair gathers its expert's weights: the products of one token column each."""
    tokens, slots = topk_ids.shape
    inter = w2.shape[-1]
    ids = topk_ids.reshape(-1)
    x = hidden_states.repeat_interleave(slots, dim=0).unsqueeze(-1)  # [P, H, 1]
    gate_up = torch.bmm(w13.index_select(0, ids), x).squeeze(-1)  # [P, 2I]
    act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).unsqueeze(-1)
    return torch.bmm(w2.index_select(0, ids), act).view(tokens, slots, -1)


def _all_experts(hidden_states, w13, w2, topk_ids) -> torch.Tensor:  # [T, S, H]
    """Every expert on every token, then each pair's rows picked: with at least as many pairs as experts, the
    weights are read once where they lie, not copied pair by pair (a batch-8 verify step on the CPU: 16 -> 13 ms).
    Equal to `_gathered_experts` up to rounding; bit for bit on CPUs whose BLAS rounds a column alike whatever
    the number of columns (an Intel Xeon did, an AMD EPYC does not; see _BMM_BLAS_MIN_MACS). The SiLU runs on
    rows of I as there, since its vector and scalar loops round apart."""
    tokens = topk_ids.shape[0]
    experts, _, inter = w2.shape
    x = hidden_states.t().expand(experts, -1, -1).contiguous()  # [E, H, T]; a batch stride of 0 rounds apart
    gate_up = torch.bmm(w13, x).transpose(1, 2).contiguous()  # [E, T, 2I]
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [E, T, I]
    y = torch.bmm(w2, act.transpose(1, 2))  # [E, H, T]
    rows = torch.arange(tokens, device=topk_ids.device)[:, None]
    return y.permute(2, 0, 1)[rows, topk_ids]
