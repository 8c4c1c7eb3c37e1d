"""Inputs of a decode step from the step still in flight, on the device, torch reference.

With async scheduling the next step is launched before the host has the current one's tokens:
each sequence feeds the token after its accepted drafts (then its new drafts), starts
num_accepted + 1 positions further on, and reads its state from slot num_accepted.
"""

import torch


def continue_decode_inputs(
    token_ids: torch.Tensor,  # [n, Q] int64, the step's emitted tokens (accepted drafts, then the next)
    num_accepted: torch.Tensor,  # [n] int64
    drafts: torch.Tensor | None,  # [n, k] int64, the step's new drafts; None without speculation
    positions: torch.Tensor,  # [n, Q] int64, the step's positions
    input_ids: torch.Tensor,  # [n * Q] int64, written: the next step's tokens
    start: torch.Tensor,  # [n] int64, written: the next step's first position
    accepted_slot: torch.Tensor,  # [n] int64, written: num_accepted + 1 (the slot its state is read from, 1-based)
) -> None:
    next_token = token_ids.gather(1, num_accepted[:, None])
    ids = next_token if drafts is None else torch.cat([next_token, drafts], dim=1)
    input_ids.copy_(ids.reshape(-1))
    start.copy_(positions[:, 0] + num_accepted + 1)
    accepted_slot.copy_(num_accepted + 1)
