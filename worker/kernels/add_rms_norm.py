"""Residual add fused with the zero-centred RMSNorm that follows it (and the norm alone), torch reference.

`residual + x` is rounded to the activation dtype (the new residual stream, as a separate add would
leave it) and then normalised: `y = r * rsqrt(mean(r^2) + eps) * (1 + w)` in fp32, rounded.
"""

import torch

from worker.kernels.qk_norm_rope import rms_norm_zero_centred


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H] the sublayer's output
    residual: torch.Tensor,  # [T, H] the residual stream so far
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
    new_residual = residual + x
    return rms_norm_zero_centred(new_residual, weight, eps), new_residual


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [T, H]
    """The same norm without a residual: `y = x * rsqrt(mean(x^2) + eps) * (1 + w)` in fp32, rounded."""
    return rms_norm_zero_centred(x, weight, eps)
