"""Residual add fused with the zero-centred RMSNorm that follows it (and the norm alone), torch reference.

`residual + x` is rounded to the activation dtype (the new residual stream, as a separate add would
leave it) and then normalised: `y = r * rsqrt(mean(r^2) + eps) * (1 + w)` in fp32, rounded.

With `quant_block`, the normed rows also carry their e4m3 groups (per_token_group_quant_fp8 of them,
attach_token_groups) for an FP8 consumer.
"""

import torch

from worker.kernels.fp8.quant import attach_token_groups, per_token_group_quant_fp8
from worker.kernels.linear import linear
from worker.kernels.qk_norm_rope import rms_norm_zero_centred


def with_token_groups(x: torch.Tensor, quant_block: int | None) -> torch.Tensor:
    """x [T, ...], with per_token_group_quant_fp8 of its [T, K] rows attached when quant_block is given."""
    if quant_block is None:
        return x
    return attach_token_groups(x, *per_token_group_quant_fp8(x.reshape(x.shape[0], -1), quant_block), quant_block)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H] the sublayer's output
    residual: torch.Tensor,  # [T, H] the residual stream so far
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
    new_residual = residual + x
    return with_token_groups(rms_norm_zero_centred(new_residual, weight, eps), quant_block), new_residual


def fused_add_rms_norm_linear(
    x: torch.Tensor,  # [T, H] the sublayer's output
    residual: torch.Tensor,  # [T, H] the residual stream so far
    weight: torch.Tensor,  # [H]
    eps: float,
    linear_weight: torch.Tensor,  # [N, H] the layer that reads the normed rows (the MoE's router)
    quant_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (y [T, N], normed [T, H], new residual [T, H])
    """fused_add_rms_norm, then the normed rows times linear_weight (no bias)."""
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps, quant_block)
    return linear(normed, linear_weight), normed, new_residual


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,
) -> torch.Tensor:  # [T, H]
    """The same norm without a residual: `y = x * rsqrt(mean(x^2) + eps) * (1 + w)` in fp32, rounded."""
    return with_token_groups(rms_norm_zero_centred(x, weight, eps), quant_block)
