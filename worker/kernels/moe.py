"""Sparse mixture of SwiGLU experts, torch reference."""

import torch
import torch.nn.functional as F


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """router_logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k]); softmax in fp32."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H], gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k]
    topk_ids: torch.Tensor,  # [T, top_k]
) -> torch.Tensor:  # [T, H]
    out = torch.zeros_like(hidden_states)
    inter = w2.shape[-1]
    for expert in topk_ids.unique().tolist():
        token_idx, slot = (topk_ids == expert).nonzero(as_tuple=True)
        x = hidden_states[token_idx]
        gate_up = x @ w13[expert].t()
        y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[expert].t()
        out.index_add_(0, token_idx, (y * topk_weights[token_idx, slot, None]).to(out.dtype))
    return out
