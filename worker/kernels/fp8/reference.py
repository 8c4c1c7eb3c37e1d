"""Block-scaled FP8 linear layers, torch references (the source of truth; any device).

`w8a8_block_fp8_linear` is what the FP8 GEMM kernel computes: activations quantised to e4m3 per
token and group of b features (dynamic scales), weights as stored, the scaled products summed, the
output in the activation dtype. The reference sums in float64, where products of e4m3 values and
float32 scales are all but exact: a row's result then does not depend on the rows around it. With
float32 sums, the last-bit differences between a decode row and the same row in a verify batch
are amplified by the next layer's e4m3 rounding (a value at a rounding boundary jumps a whole
e4m3 step): on the tiny preset greedy MTP k = 2 drifted up to 1.8 logits from k = 0. The kernel
sums in float32; its parity tests allow for the difference.

`dequant_block_fp8_linear` is the plain reference: the weight dequantised and the activations left
as they are, in the activation dtype, which is exactly the unquantised model on the dequantised weights.
"""

import torch
import torch.nn.functional as F

from worker.kernels.fp8.quant import dequantize_block_fp8, dequantize_token_groups, per_token_group_quant_fp8
from worker.kernels.linear import linear as dense_linear


def w8a8_block_fp8_linear(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N] activation dtype
    """y = dequant(quant(x)) @ dequant(weight).T + bias, summed in float64."""
    lead = x.shape[:-1]
    x_q, x_scale = per_token_group_quant_fp8(x.reshape(-1, x.shape[-1]), block)
    x_deq = dequantize_token_groups(x_q, x_scale, block)
    y = exact_linear(x_deq, dequantize_block_fp8(weight, weight_scale_inv, block))
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def w8a8_block_fp8_linear_with_dense(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    dense_weight: torch.Tensor,  # [DN, K] in x's dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, N], [T, DN])
    """An FP8 and a dense linear layer over the same input: w8a8_block_fp8_linear and x @ dense_weight.T."""
    return w8a8_block_fp8_linear(x, weight, weight_scale_inv, block), dense_linear(x, dense_weight)


def exact_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T in float64 (the inputs hold e4m3 values times float32 scales)."""
    return F.linear(x.double(), weight.double())


def dequant_block_fp8_linear(
    x: torch.Tensor,  # [T, K] activation dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/b), ceil(K/b)] float32
    block: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N] activation dtype
    """y = x @ dequant(weight).T + bias in the activation dtype, as the unquantised layer computes it."""
    return F.linear(x, dequantize_block_fp8(weight, weight_scale_inv, block).to(x.dtype), bias)
