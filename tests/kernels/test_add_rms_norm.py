"""Residual add + RMSNorm: the Triton kernel against the torch reference (outputs NaN-poisoned)."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_rel_close, generator, randn, tolerance
from worker.kernels.fp8.quant import per_token_group_quant_fp8

ref = importlib.import_module("worker.kernels.add_rms_norm")
tk = pytest.importorskip("worker.kernels.triton_add_rms_norm", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def check(tokens, hidden, dtype, device, seed):
    gen = generator(seed, device)
    args = dict(x=randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=2.0),
                residual=randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=4.0),
                weight=randn(hidden, gen=gen, device=device, scale=0.1).to(dtype), eps=1e-6)
    out, new_residual = tk.fused_add_rms_norm(**args)
    expected_out, expected_residual = ref.fused_add_rms_norm(**args)
    # The sum is one rounding of the same two numbers: exact in any dtype.
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    assert_rel_close(out, expected_out, tolerance(dtype), "normed")


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 96), (63, 200)], ids=lambda v: str(v))
def test_fused_add_rms_norm(tokens, hidden, device):
    check(tokens, hidden, torch.float32, device, seed=tokens)


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (63, 200)], ids=lambda v: str(v))
def test_rms_norm_without_a_residual(tokens, hidden, device):
    gen = generator(tokens + 1, device)
    x = randn(tokens, hidden, gen=gen, device=device, scale=2.0)
    weight = randn(hidden, gen=gen, device=device, scale=0.1)
    assert_rel_close(tk.rms_norm(x=x, weight=weight, eps=1e-6), ref.rms_norm(x=x, weight=weight, eps=1e-6),
                     tolerance(torch.float32), "normed")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7, 500, 4097])
def test_fused_add_rms_norm_real_shapes(tokens, dtype, device):
    check(tokens, 2048, dtype, device, seed=tokens)


def assert_groups_of(out, group, quant=None):
    """The e4m3 groups attached to out are those the quantisation kernel (or `quant`) makes of it, byte for byte."""
    from worker.kernels.fp8.quant import attached_token_groups
    from worker.kernels.fp8.triton import per_token_group_quant_fp8

    quant = quant or per_token_group_quant_fp8
    groups = attached_token_groups(out, group)
    assert groups is not None, "no groups attached"
    q_ref, scale_ref = quant(out.reshape(out.shape[0], -1), group)
    assert torch.equal(groups[1], scale_ref)
    assert torch.equal(groups[0].view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("tokens,hidden,group", [(1, 64, 16), (7, 200, 32), (3, 48, 64)], ids=str)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not HAS_CUDA, reason="Triton's interpreter adds bf16 wrongly (overflow, NaN)")), torch.float32], ids=["bf16", "fp32"])
def test_quantising_norm_writes_the_same_rows_and_their_e4m3_groups(tokens, hidden, group, dtype, device):
    """With quant_block the norm's outputs are unchanged (bit for bit), and its groups are those the
    quantisation kernel makes of its output (partial last groups; a row narrower than a group). The
    reference attaches the reference quantisation's."""
    gen = generator(tokens + hidden, device)
    x = randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=2.0)
    residual = randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=4.0)
    weight = randn(hidden, gen=gen, device=device, scale=0.1).to(dtype)
    plain = tk.fused_add_rms_norm(x, residual, weight, 1e-6)
    out, new_residual = tk.fused_add_rms_norm(x, residual, weight, 1e-6, quant_block=group)
    assert torch.equal(out, plain[0]) and torch.equal(new_residual, plain[1])
    assert_groups_of(out, group)
    alone = tk.rms_norm(x, weight, 1e-6, quant_block=group)
    assert torch.equal(alone, tk.rms_norm(x, weight, 1e-6))
    assert_groups_of(alone, group)
    ref_out, _ = ref.fused_add_rms_norm(x, residual, weight, 1e-6, quant_block=group)
    assert_groups_of(ref_out, group, per_token_group_quant_fp8)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("hidden,rows,group", [(64, 9, 16), (200, 13, 32), (48, 3, None)], ids=str)
def test_norm_then_linear_in_one_launch(tokens, hidden, rows, group, device, monkeypatch):
    """fused_add_rms_norm_linear: up to 4 tokens one launch whose programs each norm the rows themselves
    (a layer of 3 rows: fewer programs than the row groups they write; partial groups); 5 tokens the norm and
    the linear apart. Against the reference: the new residual exactly, the normed rows, the product, and
    with quant_block the e4m3 groups of the normed rows the kernel wrote."""
    gen = generator(tokens * hidden + rows, device)
    x = randn(tokens, hidden, gen=gen, device=device, scale=2.0)
    residual = randn(tokens, hidden, gen=gen, device=device, scale=4.0)
    weight = randn(hidden, gen=gen, device=device, scale=0.1)
    linear_weight = randn(rows, hidden, gen=gen, device=device, scale=hidden ** -0.5)
    if tokens <= tk.NORM_GEMV_MAX_TOKENS:
        monkeypatch.setattr(tk, "_launch", lambda *a: pytest.fail("the norm launched on its own"))
    y, normed, new_residual = tk.fused_add_rms_norm_linear(x, residual, weight, 1e-6, linear_weight, group)
    expected_y, expected_normed, expected_residual = ref.fused_add_rms_norm_linear(x, residual, weight, 1e-6,
                                                                                   linear_weight)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    assert_rel_close(normed, expected_normed, 1e-6, "normed")
    assert_rel_close(y, expected_y, 1e-5, "router logits")
    if group is not None:
        assert_groups_of(normed, group)


def test_norm_then_linear_refuses_a_weight_of_another_shape(device):
    x = torch.ones(1, 64, device=device)
    with pytest.raises(ValueError, match="linear_weight must be"):
        tk.fused_add_rms_norm_linear(x, x, torch.ones(64, device=device), 1e-6, torch.ones(8, 32, device=device))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_norm_then_router_real_shapes(tokens, device):
    """Qwen3-Next-80B's post-attention norm and router [513, 2048] in bf16, with the FP8 MoE's groups."""
    gen = generator(tokens, device)
    x = randn(tokens, 2048, gen=gen, device=device, dtype=torch.bfloat16, scale=2.0)
    residual = randn(tokens, 2048, gen=gen, device=device, dtype=torch.bfloat16, scale=4.0)
    weight = randn(2048, gen=gen, device=device, scale=0.1).to(torch.bfloat16)
    router = randn(513, 2048, gen=gen, device=device, scale=2048 ** -0.5).to(torch.bfloat16)
    y, normed, new_residual = tk.fused_add_rms_norm_linear(x, residual, weight, 1e-6, router, 128)
    expected_normed, expected_residual = tk.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, expected_residual)
    assert_rel_close(normed, expected_normed, 1e-2, "normed")
    assert_rel_close(y, torch.nn.functional.linear(normed.float(), router.float()), 1e-2, "router logits")
    assert_groups_of(normed, 128)
