"""Dense linear layers (unquantised weights): the torch reference of `worker.kernels.triton_linear`."""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., K], weight [N, K] -> [..., N]."""
    return F.linear(x, weight, bias)
