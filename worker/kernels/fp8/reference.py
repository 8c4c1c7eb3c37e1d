"""Block-scaled FP8 linear layers, torch references (the source of truth; any device).

`w8a8_block_fp8_linear` is what the FP8 GEMM kernel computes: activations quantised to e4m3 per
token and group of b features (dynamic scales), weights as stored, products of the two summed in
float32, the output in the activation dtype. `dequant_block_fp8_linear` is the plain reference:
the weight dequantised to float32 and the activations left as they are, which is exactly the
unquantised model run on the dequantised weights.
"""

import torch
import torch.nn.functional as F

from worker.kernels.fp8.quant import dequantize_block_fp8, dequantize_token_groups, per_token_group_quant_fp8


def w8a8_block_fp8_linear(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N] activation dtype
    """y = dequant(quant(x)) @ dequant(weight).T + bias, in float32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = per_token_group_quant_fp8(x2, block)
    y = F.linear(dequantize_token_groups(x_q, x_scale, block), dequantize_block_fp8(weight, weight_scale_inv, block))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


def dequant_block_fp8_linear(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N] activation dtype
    """y = x @ dequant(weight).T + bias in the activation dtype, as the unquantised layer computes it."""
    return F.linear(x, dequantize_block_fp8(weight, weight_scale_inv, block).to(x.dtype), bias)
