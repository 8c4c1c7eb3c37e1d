"""Residual add + RMSNorm: the Triton kernel against the torch reference (outputs NaN-poisoned)."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_rel_close, generator, randn, tolerance

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
