"""Block-scaled FP8 linear: the Triton kernels against the torch references (outputs NaN-poisoned).

The activation quantisation must give the reference's bytes exactly (a token quantises the same
in any batch); the GEMM sums in float32 where the reference sums in float64, so it is compared by
relative error. Shapes have partial blocks in N and K and odd token counts.
"""

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import LaunchSpy, assert_rel_close, generator, randn
from worker.kernels.fp8 import reference as ref
from worker.kernels.fp8.quant import per_token_group_quant_fp8, quantize_block_fp8

tk = pytest.importorskip("worker.kernels.fp8.triton", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def layer(n, k, block, gen, device, dtype):
    weight, scale = quantize_block_fp8(randn(n, k, gen=gen, device=device, scale=k ** -0.5), block)
    bias = randn(n, gen=gen, device=device, scale=0.1).to(dtype)
    return weight, scale, bias


@pytest.mark.parametrize("tokens,features,group", [(1, 64, 16), (7, 200, 32), (63, 300, 128)], ids=str)
def test_token_group_quant_gives_the_reference_bytes(tokens, features, group, device):
    x = randn(tokens, features, gen=generator(tokens, device), device=device, scale=3.0)
    x[0, :5] = 0.0  # a partly zero group
    q, scale = tk.per_token_group_quant_fp8(x, group)
    q_ref, scale_ref = per_token_group_quant_fp8(x, group)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_rounding_carries_into_the_exponent_and_keeps_subnormals(device):
    """Values that round up into the next binade (124 -> 128, 7.8 -> 8) and e4m3 subnormals: the cases
    a wrong cast gets wrong. 448 in the group makes the scale 1."""
    values = [448.0, 124.0, 125.0, 7.8, 15.9, -124.5, 0.0019, 1e-3, 2.9, 61.0, -0.01, 3.5, 0.0, 447.0, 100.0, 1.0]
    x = torch.tensor([values], device=device)
    q, scale = tk.per_token_group_quant_fp8(x, 16)
    q_ref, scale_ref = per_token_group_quant_fp8(x, 16)
    assert scale.item() == 1.0 and torch.equal(scale, scale_ref)
    assert q.float().tolist() == q_ref.float().tolist()


@pytest.mark.parametrize("tokens,n,k,block", [(1, 96, 64, 32), (5, 200, 300, 64), (33, 64, 160, 32)], ids=str)
def test_block_fp8_linear_matches_the_reference(tokens, n, k, block, device):
    gen = generator(tokens + n, device)
    weight, scale, bias = layer(n, k, block, gen, device, torch.float32)
    x = randn(tokens, k, gen=gen, device=device)
    for with_bias in (None, bias):
        out = tk.w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=block, bias=with_bias)
        expected = ref.w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=block, bias=with_bias)
        assert_rel_close(out, expected, 1e-5, "fp32 output")


def test_a_row_gives_the_same_bits_in_any_batch(device):
    """Within each kernel: the GEMM (9 rows against 5) and the GEMV (3 rows against 1). Where the launcher
    switches between them (GEMV_MAX_TOKENS) the sums round differently."""
    gen = generator(3, device)
    weight, scale, _ = layer(128, 96, 32, gen, device, torch.float32)
    x = randn(9, 96, gen=gen, device=device)
    batch = tk.w8a8_block_fp8_linear(x, weight, scale, 32)
    fewer = tk.w8a8_block_fp8_linear(x[2:7], weight, scale, 32)
    assert torch.equal(batch[4:5], fewer[2:3])
    small = tk.w8a8_block_fp8_linear(x[3:6], weight, scale, 32)
    alone = tk.w8a8_block_fp8_linear(x[4:5], weight, scale, 32)
    assert torch.equal(small[1:2], alone)


@pytest.mark.parametrize("tile", [dict(BN=4, NB=1), dict(BN=16, NB=2), dict(BN=8, NB=4)], ids=str)
@pytest.mark.parametrize("tokens,n,k,block", [(1, 96, 64, 32), (3, 136, 200, 64)], ids=str)
def test_block_fp8_gemv_matches_the_reference(tokens, n, k, block, tile, device):
    """The few-token path: partial blocks in N and K, K walked NB blocks at a time past its end."""
    gen = generator(tokens + n, device)
    weight, scale, bias = layer(n, k, block, gen, device, torch.float32)
    x = randn(tokens, k, gen=gen, device=device)
    x[0, :5] = 0.0
    for with_bias in (None, bias):
        out = tk.w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=block, bias=with_bias,
                                       tile=dict(tile, gemv=True, num_warps=2))
        expected = ref.w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=block, bias=with_bias)
        assert_rel_close(out, expected, 1e-5, "fp32 output")


@pytest.mark.parametrize("tokens", [1, 3])
def test_block_fp8_gemv_prequantised_activations_give_the_same_bits(tokens, device):
    """`"prequant"`: the features quantised by one per_token_group_quant_fp8 launch, the rounding each
    GEMV program does itself otherwise, so the output is bit-identical (partial blocks in N and K)."""
    gen = generator(5 + tokens, device)
    weight, scale, bias = layer(136, 200, 64, gen, device, torch.float32)
    x = randn(tokens, 200, gen=gen, device=device, scale=2.0)
    outs = [tk.w8a8_block_fp8_linear(x=x, weight=weight, weight_scale_inv=scale, block=64, bias=bias,
                                     tile=dict(gemv=True, BN=8, NB=2, num_warps=2, prequant=prequant))
            for prequant in (False, True)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("prequant", [False, True])
@pytest.mark.parametrize("tokens", [2, 3, 4, 7])
def test_gemv_all_tokens_in_one_program_gives_the_same_bits(tokens, prequant, device, monkeypatch):
    """`"all_tokens"`: one program per row tile takes every token (each weight tile read once for all), the
    same sums as a program per token, bit for bit; 3 and 7 tokens leave part of the program's tokens empty."""
    gen = generator(13 + tokens, device)
    weight, scale, bias = layer(136, 200, 64, gen, device, torch.float32)
    x = randn(tokens, 200, gen=gen, device=device, scale=2.0)
    tile = dict(gemv=True, BN=8, NB=2, num_warps=2, prequant=prequant)
    per_token = tk.w8a8_block_fp8_linear(x, weight, scale, 64, bias=bias, tile=tile)
    spy = LaunchSpy(tk._block_fp8_gemv_kernel)
    monkeypatch.setattr(tk, "_block_fp8_gemv_kernel", spy)
    together = tk.w8a8_block_fp8_linear(x, weight, scale, 64, bias=bias, tile=dict(tile, all_tokens=True))
    assert spy.grids == [(17, 1)]
    assert torch.equal(together, per_token)


@pytest.mark.parametrize("tokens", [1, 3])
def test_gemv_all_tokens_with_dense_rows(tokens, device):
    gen = generator(17 + tokens, device)
    weight, scale, _ = layer(136, 200, 64, gen, device, torch.float32)
    dense = randn(13, 200, gen=gen, device=device, scale=200 ** -0.5)
    x = randn(tokens, 200, gen=gen, device=device, scale=2.0)
    tile = dict(gemv=True, BN=8, NB=2, num_warps=2, prequant=True)
    apart = tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 64, dense, tile=tile, dense_tile=dict(BN=4, BK=64))
    together = tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 64, dense, tile=dict(tile, all_tokens=True),
                                                   dense_tile=dict(BN=4, BK=64))
    assert torch.equal(together[0], apart[0]) and torch.equal(together[1], apart[1])


@pytest.mark.parametrize("tile", [dict(gemv=True, BN=8, NB=2, num_warps=2),
                                  dict(BM=16, BN=32, GROUP_M=1, num_warps=4, num_stages=2)], ids=["gemv", "gemm"])
def test_groups_quantised_already_give_the_same_bits(tile, device):
    """x_groups (a norm's e4m3 groups of x) stand in for the kernels' own quantisation of x."""
    gen = generator(9, device)
    weight, scale, bias = layer(136, 200, 64, gen, device, torch.float32)
    x = randn(3, 200, gen=gen, device=device, scale=2.0)
    args = dict(x=x, weight=weight, weight_scale_inv=scale, block=64, bias=bias, tile=tile)
    groups = tk.per_token_group_quant_fp8(x, 64)
    assert torch.equal(tk.w8a8_block_fp8_linear(**args), tk.w8a8_block_fp8_linear(**args, x_groups=groups))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("prequant", [False, True])
def test_gemv_with_dense_rows_is_both_layers_in_one_launch(tokens, prequant, device, monkeypatch):
    """An FP8 weight's GEMV with a dense weight's rows in programs of their own (the GDN's FP8 in_proj_qkvz
    and bf16 in_proj_ba): the FP8 rows' bits are the GEMV's alone, the dense rows match x @ w.T; partial
    tiles in both (13 dense rows in tiles of 4, K 200 in steps of 64)."""
    gen = generator(11 + tokens, device)
    weight, scale, _ = layer(136, 200, 64, gen, device, torch.float32)
    dense = randn(13, 200, gen=gen, device=device, scale=200 ** -0.5)
    x = randn(tokens, 200, gen=gen, device=device, scale=2.0)
    tile = dict(gemv=True, BN=8, NB=2, num_warps=2, prequant=prequant)
    monkeypatch.setattr(tk.triton_linear, "linear", lambda *a, **kw: pytest.fail("a second launch"))
    out, dense_out = tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 64, dense, tile=tile,
                                                         dense_tile=dict(BN=4, BK=64))
    assert torch.equal(out, tk.w8a8_block_fp8_linear(x, weight, scale, 64, tile=tile))
    assert_rel_close(dense_out, x.double().matmul(dense.double().t()).float(), 1e-6, "dense rows")


def test_with_dense_takes_two_calls_where_the_fp8_layer_takes_the_gemm(device):
    gen = generator(12, device)
    weight, scale, _ = layer(136, 200, 64, gen, device, torch.float32)
    dense = randn(13, 200, gen=gen, device=device)
    x = randn(5, 200, gen=gen, device=device)
    tile = dict(BM=16, BN=32, GROUP_M=1, num_warps=4, num_stages=2)
    out, dense_out = tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 64, dense, tile=tile)
    assert torch.equal(out, tk.w8a8_block_fp8_linear(x, weight, scale, 64, tile=tile))
    assert torch.equal(dense_out, tk.triton_linear.linear(x, dense))
    with pytest.raises(ValueError, match="dense_weight must be"):
        tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 64, dense.double(), tile=tile)


def test_bad_shapes_are_refused(device):
    weight, scale, _ = layer(64, 64, 32, generator(0, device), device, torch.float32)
    with pytest.raises(ValueError, match="weight_scale_inv must be"):
        tk.w8a8_block_fp8_linear(torch.zeros(1, 64, device=device), weight, scale[:1], 32)
    with pytest.raises(ValueError, match="power-of-two block"):
        tk.w8a8_block_fp8_linear(torch.zeros(1, 64, device=device), weight, torch.ones(3, 3, device=device), 24)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 3, 16, 100, 2048])
@pytest.mark.parametrize("n,k", [(12288, 2048), (2048, 4096), (2048, 512)], ids=["qkvz", "out_proj", "expert-down"])
def test_block_fp8_linear_real_shapes(tokens, n, k, device):
    """(The GDN's FP8 in_proj_qkvz with its bf16 in_proj_ba: test_gdn_input_projections_real_shapes.)"""
    gen = generator(tokens, device)
    weight, scale, _ = layer(n, k, 128, gen, device, torch.bfloat16)
    x = randn(tokens, k, gen=gen, device=device, dtype=torch.bfloat16)
    out = tk.w8a8_block_fp8_linear(x, weight, scale, 128)
    expected = ref.w8a8_block_fp8_linear(x, weight, scale, 128)
    assert_rel_close(out, expected, 1e-2, "bf16 output")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
def test_gdn_input_projections_real_shapes(tokens, device):
    """Qwen3-Next-80B's FP8 in_proj_qkvz [12288, 2048] and bf16 in_proj_ba [64, 2048] with the tuned tiles: one
    launch where the FP8 layer takes its GEMV, two otherwise; both against the references."""
    gen = generator(tokens, device)
    weight, scale, _ = layer(12288, 2048, 128, gen, device, torch.bfloat16)
    dense = randn(64, 2048, gen=gen, device=device, scale=2048 ** -0.5).to(torch.bfloat16)
    x = randn(tokens, 2048, gen=gen, device=device, dtype=torch.bfloat16)
    out, dense_out = tk.w8a8_block_fp8_linear_with_dense(x, weight, scale, 128, dense)
    assert_rel_close(out, ref.w8a8_block_fp8_linear(x, weight, scale, 128), 1e-2, "FP8 rows")
    assert_rel_close(dense_out, torch.nn.functional.linear(x.float(), dense.float()), 1e-2, "dense rows")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(12288, 2048), (2048, 4096)], ids=["qkvz", "out_proj"])
def test_gemv_all_tokens_real_shapes(tokens, n, k, device):
    """`"all_tokens"` at the 80B's shapes, the H200's one-token tiles: against a program per token and the
    reference."""
    gen = generator(tokens + 40, device)
    weight, scale, _ = layer(n, k, 128, gen, device, torch.bfloat16)
    x = randn(tokens, k, gen=gen, device=device, dtype=torch.bfloat16)
    tile = dict(tk.get_tile(1, n, k, 128, x.device))
    assert tile.get("gemv"), tile
    per_token = tk.w8a8_block_fp8_linear(x, weight, scale, 128, tile=tile)
    together = tk.w8a8_block_fp8_linear(x, weight, scale, 128, tile=dict(tile, all_tokens=True))
    assert_rel_close(together, per_token, 1e-6, "all tokens in one program")
    assert_rel_close(together, ref.w8a8_block_fp8_linear(x, weight, scale, 128), 1e-2, "bf16 output")
