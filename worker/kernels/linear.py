"""Dense linear layers (unquantised weights): the torch reference of `worker.kernels.triton_linear`."""

import torch
import torch.nn.functional as F

# MKL's CPU sgemm (fp32) multiplies 2 or 3 rows x [M, K] by weight.T at about the cost of as many separate rows.
# The same product as weight @ x.T ([N, M], the weight's rows against M columns) takes another path,
# which on an AMD EPYC runs it in about half the time (the k = 2 verify step's rows, in the built-in
# model's step: the [3, 192] x [192, 4096] lm_head 0.7-0.8 -> 0.27 ms, the [3, 192] x [192, 768] qkv
# 0.11-0.14 -> 0.06 ms). One row, and 4 rows or more, keep F.linear (at 8 rows it is the faster one). Each
# output is the same dot product of K terms, though not summed in the same order: the rows' bits may
# differ from F.linear's (as F.linear's own do between 1, 2-3 and 4+ rows). Below _CPU_TRANSPOSED_MIN_WEIGHT
# elements (the [8, 192] router, the [1, 192] shared expert gate) the copy into rows costs more than it saves.
_CPU_TRANSPOSED_ROWS = (2, 3)
_CPU_TRANSPOSED_MIN_WEIGHT = 1 << 14


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias: x [..., K], weight [N, K] -> [..., N]."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.shape[0] in _CPU_TRANSPOSED_ROWS and weight.numel() >= _CPU_TRANSPOSED_MIN_WEIGHT):
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)
