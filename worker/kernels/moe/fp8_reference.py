"""The fused MoE over block-scaled FP8 experts, torch references (the source of truth; any device).

Weights as worker.kernels.moe.reference.fused_moe takes them, stored in float8_e4m3fn with a float32
scale per b x b block: w13 [E, 2I, H] with w13_scale_inv [E, 2I/b, ceil(H/b)], w2 [E, H, I] with
w2_scale_inv [E, ceil(H/b), I/b]. I is a multiple of b, so no block holds both gate and up rows
(the layer pads narrower experts with zeros). `fused_moe_fp8` computes what the FP8 MoE kernel will:
the tokens quantised to e4m3 per group of b features before the gate/up GEMM, the SwiGLU output
(rounded to float32, as the kernel holds it) again before the down GEMM; products summed in float64
for the reason worker/kernels/fp8/reference.py gives. `fused_moe_fp8_dequant` is the plain
reference: the unquantised fused MoE on the dequantised weights.
"""

import torch
import torch.nn.functional as F

from worker.kernels.fp8.quant import dequantize_block_fp8, dequantize_token_groups, per_token_group_quant_fp8
from worker.kernels.fp8.reference import exact_linear
from worker.kernels.moe.reference import fused_moe


def _quantized(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [T, K] as the kernel sees it: rounded to e4m3 per token group, back in float32."""
    return dequantize_token_groups(*per_token_group_quant_fp8(x, block), block)


def fused_moe_fp8(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] float8_e4m3fn, gate rows then up rows
    w2: torch.Tensor,  # [E, H, I] float8_e4m3fn
    w13_scale_inv: torch.Tensor,  # [E, 2I/b, ceil(H/b)] float32
    w2_scale_inv: torch.Tensor,  # [E, ceil(H/b), I/b] float32
    topk_weights: torch.Tensor,  # [T, S] fp32
    topk_ids: torch.Tensor,  # [T, S]
    block: int,
) -> torch.Tensor:  # [T, H]
    """sum over slots s of topk_weights[t, s] * down(q(silu(gate(q(x))) * up(q(x)))), q: e4m3 per group."""
    inter = w2.shape[-1]
    if inter % block:
        raise ValueError(f"w2 has {inter} intermediate columns, not a multiple of the block {block}")
    x = _quantized(hidden_states, block)  # per token: the same whichever experts the token goes to
    out = torch.zeros(hidden_states.shape, dtype=torch.float64, device=hidden_states.device)
    for expert in topk_ids.unique().tolist():
        token_idx, slot = (topk_ids == expert).nonzero(as_tuple=True)
        gate_up = exact_linear(x[token_idx], dequantize_block_fp8(w13[expert], w13_scale_inv[expert], block))
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).float()
        y = exact_linear(_quantized(act, block), dequantize_block_fp8(w2[expert], w2_scale_inv[expert], block))
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].double())
    return out.to(hidden_states.dtype)


def fused_moe_fp8_dequant(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] float8_e4m3fn
    w2: torch.Tensor,  # [E, H, I] float8_e4m3fn
    w13_scale_inv: torch.Tensor,  # [E, 2I/b, ceil(H/b)] float32
    w2_scale_inv: torch.Tensor,  # [E, ceil(H/b), I/b] float32
    topk_weights: torch.Tensor,  # [T, S] fp32
    topk_ids: torch.Tensor,  # [T, S]
    block: int,
) -> torch.Tensor:  # [T, H]
    dtype = hidden_states.dtype
    return fused_moe(hidden_states, dequantize_block_fp8(w13, w13_scale_inv, block).to(dtype),
                     dequantize_block_fp8(w2, w2_scale_inv, block).to(dtype), topk_weights, topk_ids)
