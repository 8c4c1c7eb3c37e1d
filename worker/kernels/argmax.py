"""Greedy token choice: the index of each row's largest logit, the first one on ties, torch reference."""

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> int64 [...]: the first index of each row's maximum."""
    return logits.argmax(dim=-1)
