"""The Gated DeltaNet's output norm, torch reference: RMSNorm with a plain weight, then a SiLU gate.

`y = (w * rms_norm(x)) * silu(z)` per row of V features, with the norm rounded to the activation
dtype before the weight and the gate, as Qwen3-Next's `Qwen3NextRMSNormGated` computes it.
With `quant_block`, the output carries the e4m3 groups of each token's features (with_token_groups).
"""

import torch
import torch.nn.functional as F

from worker.kernels.add_rms_norm import with_token_groups


def gated_rms_norm(
    x: torch.Tensor,  # [R, V] the core attention output, one row per (token, value head)
    z: torch.Tensor,  # [R, V] the gate
    weight: torch.Tensor,  # [V]
    eps: float,
    quant_block: int | None = None,
) -> torch.Tensor:  # [R, V] in x's dtype
    xf = x.float()
    y = F.rms_norm(xf, xf.shape[-1:], eps=eps).to(x.dtype)  # xf * rsqrt(mean(xf^2) + eps), bit for bit
    y = weight * y
    return with_token_groups((y.float() * F.silu(z.float())).to(x.dtype), quant_block)
