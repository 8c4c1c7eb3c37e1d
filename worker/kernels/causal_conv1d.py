"""Depthwise causal conv1d with SiLU over the GDN q/k/v channels, torch reference.

The conv state of a sequence is `[D, K-1+k]`: the K-1 inputs before the next token start at column
`num_accepted - 1` (a verify step appends 1+k columns; the window that matters depends on how many
drafts were accepted, so nothing is copied after verification).
"""

import torch
import torch.nn.functional as F


def _conv_window(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """window [..., D, L + K - 1] -> [..., D, L], depthwise valid convolution."""
    kernel = weight.shape[-1]
    cols = window.unfold(-1, kernel, 1)  # [..., D, L, K]
    return torch.einsum("...dlk,dk->...dl", cols, weight)


def causal_conv1d_fn(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D, K]
    cu_seqlens: torch.Tensor,  # [N+1]
    conv_states: torch.Tensor,  # [G, D, K-1+k]
    state_indices: torch.Tensor,  # [N], PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N]
    has_initial_state: torch.Tensor,  # [N] bool
    activation: str | None = "silu",
) -> torch.Tensor:  # [T, D]
    """Prefill over packed sequences; the last K-1 inputs of each are written to columns 0..K-2 of its state."""
    kernel = weight.shape[-1]
    out = torch.zeros_like(x)
    bounds = cu_seqlens.tolist()
    groups, accepted, has_init = state_indices.tolist(), num_accepted.tolist(), has_initial_state.tolist()
    for n in range(len(bounds) - 1):
        start, end = bounds[n], bounds[n + 1]
        if groups[n] < 0 or end == start:
            continue
        state = conv_states[groups[n]]
        if has_init[n]:
            prev = state[:, accepted[n] - 1 : accepted[n] - 1 + kernel - 1].to(x.dtype)
        else:
            prev = x.new_zeros(x.shape[1], kernel - 1)
        window = torch.cat([prev, x[start:end].t()], dim=-1)  # [D, K-1+L]
        y = _conv_window(window.float(), weight.float())
        out[start:end] = (F.silu(y) if activation == "silu" else y).t().to(out.dtype)
        state[:, : kernel - 1] = window[:, -(kernel - 1) :].to(state.dtype)
    return out


def causal_conv1d_update(
    x: torch.Tensor,  # [N, Q, D] with Q = 1 + k
    weight: torch.Tensor,  # [D, K]
    conv_states: torch.Tensor,  # [G, D, K-1+k]
    state_indices: torch.Tensor,  # [N], PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N]
    activation: str | None = "silu",
) -> torch.Tensor:  # [N, Q, D]
    """Decode / verify: reads the window at column num_accepted-1, stores the last K-1+k inputs."""
    kernel = weight.shape[-1]
    width = conv_states.shape[-1]
    out = torch.zeros_like(x)
    valid = (state_indices >= 0).nonzero().flatten()
    if valid.numel() == 0:
        return out
    groups = state_indices[valid]
    states = conv_states[groups]  # [n, D, W]
    offsets = (num_accepted[valid] - 1)[:, None, None] + torch.arange(kernel - 1, device=x.device)
    prev = states.gather(-1, offsets.expand(-1, states.shape[1], -1))  # [n, D, K-1]
    window = torch.cat([prev.to(x.dtype), x[valid].transpose(1, 2)], dim=-1)  # [n, D, K-1+Q]
    y = _conv_window(window.float(), weight.float())
    out[valid] = (F.silu(y) if activation == "silu" else y).transpose(1, 2).to(out.dtype)
    conv_states[groups] = window[..., -width:].to(conv_states.dtype)
    return out
