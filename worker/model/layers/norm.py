import torch
from torch import nn

from worker import kernels
from worker.distributed import get_tp


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm in fp32: y = x * rsqrt(mean(x^2) + eps) * (1 + w).

    Given the residual stream too, it adds x to it first (one fused kernel on the GPU) and returns
    (normed, new residual).

    `quant_block` is set where an FP8 layer reads the output (feeds_fp8): the kernel then writes the
    output's e4m3 groups too, which that layer reads instead of quantising again."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.quant_block: int | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps, self.quant_block)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, self.quant_block)


class AllReduceRMSNorm(RMSNorm):
    """The norm after a sublayer whose row-parallel projection leaves the sum over tensor-parallel
    ranks to it (`reduce_results=False`): given the residual stream, it sums x over the ranks, adds it
    to the residual and normalises (TensorParallel.all_reduce_add_rms_norm) -> (normed, new residual).
    Without one, x is whole on every rank (the embedding, the MTP's input) and it is the plain norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.tp = get_tp()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        return self.tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps, self.quant_block)


class GatedRMSNorm(nn.Module):
    """Norm then gate, with a plain (not zero-centred) weight: y = w * norm(x) * silu(z). `quant_block` as
    RMSNorm's, for each token's features (flatten_tokens keeps the groups)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.quant_block: int | None = None

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rms_norm(x, z, self.weight, self.eps, self.quant_block)
