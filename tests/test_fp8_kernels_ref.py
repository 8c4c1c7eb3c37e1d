"""The block-scaled FP8 references (worker/kernels/fp8, worker/kernels/moe/fp8_reference.py) against
the e4m3 format's own guarantees and against independent, loop-by-block formulations.

Test data comes from the portable generator, so the values are the same bytes on every CPU; the
shapes have partial blocks (200 x 300 with 128 blocks) and odd token counts.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker import kernels
from worker.kernels.fp8.quant import (
    FP8_DTYPE, FP8_MAX, dequantize_block_fp8, dequantize_token_groups, per_token_group_quant_fp8, quantize_block_fp8,
)
from worker.kernels.fp8.reference import dequant_block_fp8_linear, w8a8_block_fp8_linear
from worker.kernels.moe.fp8_reference import fused_moe_fp8, fused_moe_fp8_dequant
from worker.kernels.moe.reference import fused_moe, select_experts
from worker.tools.tiny_weights import PortableRandom

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself.
E4M3_RELATIVE = 2.0**-4
E4M3_MIN_NORMAL = 2.0**-6


def portable(*shape, seed: int, std: float = 1.0) -> torch.Tensor:
    values = PortableRandom(seed).normal(math.prod(shape)) * std
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def assert_within_e4m3(original: torch.Tensor, restored: torch.Tensor, scale: torch.Tensor) -> None:
    """|x - restored| <= 2^-4 |x| where x / scale is a normal e4m3 value, else <= half its subnormal step."""
    err = (original - restored).abs()
    bound = torch.maximum(original.abs() * E4M3_RELATIVE, scale * 2.0**-10)
    assert bool((err <= bound * (1 + 1e-6)).all()), (err - bound).max()


# ---------------------------------------------------------------- the number format

@pytest.mark.parametrize("shape,block", [((200, 300), 128), ((64, 64), 128), ((3, 256, 96), 32)],
                         ids=["partial-blocks", "one-partial-block", "stacked"])
def test_weight_blocks_scale_to_448_and_round_within_half_a_step(shape, block):
    w = portable(*shape, seed=1, std=0.05)
    w[..., 0, 0] = 0.9  # an outlier: its block's scale is larger than its neighbours'
    q, scale = quantize_block_fp8(w, block)
    rows, cols = shape[-2:]
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (*shape[:-2], -(-rows // block), -(-cols // block))
    # Every block holds +-448 at its largest element: the scale is amax / 448, computed per block.
    padded = torch.zeros(*shape[:-2], scale.shape[-2] * block, scale.shape[-1] * block)
    padded[..., :rows, :cols] = q.float().abs()
    block_max = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block)).amax(dim=(-3, -1))
    assert torch.equal(block_max, torch.full_like(block_max, FP8_MAX))
    restored = dequantize_block_fp8(q, scale, block)
    assert restored.shape == w.shape
    per_element = scale.repeat_interleave(block, -2)[..., :rows, :].repeat_interleave(block, -1)[..., :cols]
    assert_within_e4m3(w, restored, per_element)


def test_an_all_zero_block_gets_a_finite_scale():
    w = portable(256, 256, seed=2)
    w[128:, :128] = 0
    q, scale = quantize_block_fp8(w, 128)
    assert torch.isfinite(scale).all() and scale[1, 0] > 0
    assert torch.equal(dequantize_block_fp8(q, scale, 128)[128:, :128], torch.zeros(128, 128))


@pytest.mark.parametrize("tokens,features,group", [(1, 64, 128), (63, 300, 128), (500, 96, 32)],
                         ids=lambda v: str(v))
def test_token_groups_quantise_each_row_alone(tokens, features, group):
    x = portable(tokens, features, seed=tokens)
    x[0, :5] = 40.0  # one large group next to normal ones
    x_q, x_scale = per_token_group_quant_fp8(x, group)
    assert x_q.shape == x.shape and x_scale.shape == (tokens, -(-features // group))
    groups = -(-features // group)
    padded = torch.zeros(tokens, groups * group)
    padded[:, :features] = x_q.float().abs()
    assert torch.equal(padded.view(tokens, groups, group).amax(-1), torch.full((tokens, groups), FP8_MAX))
    restored = dequantize_token_groups(x_q, x_scale, group)
    assert_within_e4m3(x, restored, x_scale.repeat_interleave(group, -1)[:, :features])
    # A token quantises the same alone or in any batch: the FP8 path keeps batch invariance.
    alone_q, alone_scale = per_token_group_quant_fp8(x[-1:], group)
    assert torch.equal(alone_q.float(), x_q[-1:].float()) and torch.equal(alone_scale, x_scale[-1:])


# ---------------------------------------------------------------- the linear layer's GEMM

def blockwise_w8a8(x, weight, weight_scale_inv, block):
    """The kernel's loop: per K block, the e4m3 products summed, then scaled by both blocks' scales (float64)."""
    x_q, x_scale = per_token_group_quant_fp8(x, block)
    xq, wq = x_q.double(), weight.double()
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float64)
    row_scale = weight_scale_inv.double().repeat_interleave(block, 0)[: weight.shape[0]]  # [N, K blocks]
    for j in range(x_scale.shape[1]):
        ks = slice(j * block, (j + 1) * block)
        out += (xq[:, ks] @ wq[:, ks].T) * x_scale[:, j : j + 1].double() * row_scale[None, :, j]
    return out


@pytest.mark.parametrize("tokens,n,k,block", [(1, 200, 300, 128), (63, 256, 128, 128), (500, 96, 80, 16)],
                         ids=lambda v: str(v))
def test_w8a8_linear_equals_the_blockwise_loop(tokens, n, k, block):
    x = portable(tokens, k, seed=3 + tokens)
    weight, scale = quantize_block_fp8(portable(n, k, seed=4, std=k**-0.5), block)
    bias = portable(n, seed=5)
    out = w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=block, bias=bias)
    expected = blockwise_w8a8(x, weight, scale, block) + bias.double()
    assert out.dtype == x.dtype and out.shape == (tokens, n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert kernels.fp8_block_linear(x, weight, scale, block, bias).equal(out), "CPU dispatch is the reference"


def test_w8a8_output_dtype_follows_the_activations():
    x = portable(7, 256, seed=6).bfloat16()
    weight, scale = quantize_block_fp8(portable(128, 256, seed=7, std=1 / 16), 128)
    out = w8a8_block_fp8_linear(x, weight, scale, 128)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), blockwise_w8a8(x.float(), weight, scale, 128).float(), rtol=1e-2,
                               atol=1e-2)


def test_an_empty_batch_gives_an_empty_output():
    weight, scale = quantize_block_fp8(portable(200, 300, seed=12, std=0.05), 128)
    assert w8a8_block_fp8_linear(torch.empty(0, 300), weight, scale, 128).shape == (0, 200)
    x, w13, w2, s13, s2, weights, ids = moe_inputs(1, 4, 64, 128, 2, 128, seed=13)
    assert fused_moe_fp8(x[:0], w13, w2, s13, s2, weights[:0], ids[:0], 128).shape == (0, 64)


def test_dequant_linear_is_the_unquantised_layer_on_the_dequantised_weight():
    x = portable(33, 300, seed=8)
    weight, scale = quantize_block_fp8(portable(200, 300, seed=9, std=300**-0.5), 128)
    out = dequant_block_fp8_linear(x, weight, scale, 128)
    assert torch.equal(out, F.linear(x, dequantize_block_fp8(weight, scale, 128)))


def test_activation_quantisation_costs_about_e4m3s_rounding():
    """Each activation moves by at most 2^-4 of itself (rms ~2.5% for these draws); with random
    weights the output's relative error is of that size, far below a wrong scale's."""
    x = portable(64, 512, seed=10)
    weight, scale = quantize_block_fp8(portable(256, 512, seed=11, std=512**-0.5), 128)
    exact = dequant_block_fp8_linear(x, weight, scale, 128)
    err = (w8a8_block_fp8_linear(x, weight, scale, 128) - exact).norm() / exact.norm()
    assert 0.005 < err < 0.04, err


# ---------------------------------------------------------------- the FP8 fused MoE

def moe_inputs(tokens, experts, hidden, inter, top_k, block, seed):
    x = portable(tokens, hidden, seed=seed)
    w13, s13 = quantize_block_fp8(portable(experts, 2 * inter, hidden, seed=seed + 1, std=hidden**-0.5), block)
    w2, s2 = quantize_block_fp8(portable(experts, hidden, inter, seed=seed + 2, std=inter**-0.5), block)
    logits = portable(tokens, experts, seed=seed + 3, std=2.0)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, s13, s2, weights, ids


@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k,block",
                         [(1, 4, 128, 128, 2, 128), (63, 9, 200, 256, 3, 128), (40, 8, 64, 32, 2, 16)],
                         ids=lambda v: str(v))
def test_fused_moe_fp8_equals_a_per_token_loop(tokens, experts, hidden, inter, top_k, block):
    x, w13, w2, s13, s2, weights, ids = moe_inputs(tokens, experts, hidden, inter, top_k, block, seed=tokens)
    out = fused_moe_fp8(hidden_states=x, w13=w13, w2=w2, w13_scale_inv=s13, w2_scale_inv=s2, topk_weights=weights,
                        topk_ids=ids, block=block)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for s in range(top_k):
            e = ids[t, s]
            gate_up = blockwise_w8a8(x[t : t + 1], w13[e], s13[e], block)
            act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).float()
            expected[t] += weights[t, s].double() * blockwise_w8a8(act, w2[e], s2[e], block)[0]
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert kernels.fused_moe_fp8(x, w13, w2, s13, s2, weights, ids, block).equal(out), "CPU dispatch is the reference"
    plain = fused_moe_fp8_dequant(x, w13, w2, s13, s2, weights, ids, block)
    dequantized = fused_moe(x, dequantize_block_fp8(w13, s13, block), dequantize_block_fp8(w2, s2, block), weights, ids)
    assert torch.equal(plain, dequantized)
    assert (out - plain).norm() / plain.norm() < 0.06, "activation quantisation moved the output too far"


def test_fused_moe_fp8_refuses_an_intermediate_width_that_splits_a_block():
    x, w13, w2, s13, s2, weights, ids = moe_inputs(5, 4, 64, 48, 2, 32, seed=20)
    with pytest.raises(ValueError, match="not a multiple of the block 32"):
        fused_moe_fp8(x, w13, w2, s13, s2, weights, ids, 32)
