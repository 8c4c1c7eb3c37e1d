"""Dense linear layers (unquantised weights): the torch reference of `worker.kernels.triton_linear`."""

import torch
import torch.nn.functional as F

# MKL's CPU sgemm multiplies 2 or 3 rows at about the cost of as many separate rows, and 4 or more blocked
# together (a [3, 192] x [192, 4096] product, the verify step's lm_head at k = 2: 1.1 ms in the step against
# 0.72 ms padded to 4 rows). So on the CPU, 2 or 3 rows against a weight of at least this many elements
# (copying the rows costs more than it saves on smaller ones) are padded with zero rows to 4. A row's
# result is then the one it gets in any product of 4 or more rows (of another batch size, say); its bits
# differ from a product of 1 row, as those of 2 and 3 rows already did.
_CPU_PAD_MIN_WEIGHT = 1 << 19
_CPU_PAD_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., K], weight [N, K] -> [..., N]."""
    if x.device.type == "cpu" and weight.numel() >= _CPU_PAD_MIN_WEIGHT and x.dim() == 2 and 1 < x.shape[0] < _CPU_PAD_ROWS:
        rows = x.shape[0]
        padded = torch.cat([x, x.new_zeros(_CPU_PAD_ROWS - rows, x.shape[1])])
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)
