"""The GDN output norm (RMSNorm, weight, SiLU gate): the Triton kernel against the torch reference
(outputs NaN-poisoned)."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_rel_close, generator, randn, tolerance

ref = importlib.import_module("worker.kernels.gated_rms_norm")
tk = pytest.importorskip("worker.kernels.triton_gated_rms_norm", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def check(rows, dim, dtype, device, seed):
    gen = generator(seed, device)
    args = dict(x=randn(rows, dim, gen=gen, device=device, dtype=dtype, scale=2.0),
                z=randn(rows, dim, gen=gen, device=device, dtype=dtype),
                weight=(1 + randn(dim, gen=gen, device=device, scale=0.1)).to(dtype), eps=1e-6)
    assert_rel_close(tk.gated_rms_norm(**args), ref.gated_rms_norm(**args), tolerance(dtype), "gated norm")


@pytest.mark.parametrize("rows,dim", [(1, 48), (7, 128), (63, 100)], ids=str)
def test_gated_rms_norm(rows, dim, device):
    check(rows, dim, torch.float32, device, seed=rows)


def test_heads_of_a_wider_buffer_are_read_in_place(device):
    """x [T, H, V] contiguous, z [T, H, V] the last columns of a projection's output, as the GDN passes them."""
    gen = generator(1, device)
    x = randn(5, 3, 32, gen=gen, device=device)
    z = randn(5, 200, gen=gen, device=device)[:, 104:].view(5, 3, 32)
    weight = 1 + randn(32, gen=gen, device=device, scale=0.1)
    out = tk.gated_rms_norm(x, z, weight, 1e-6)
    assert out.shape == (5, 3, 32)
    assert_rel_close(out, ref.gated_rms_norm(x, z, weight, 1e-6), 1e-5, "strided heads")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 64, 4097])
def test_gated_rms_norm_real_shapes(tokens, dtype, device):
    check(tokens * 32, 128, dtype, device, seed=tokens)  # 32 value heads of 128


@pytest.mark.parametrize("heads,dim,group", [(3, 32, 32), (2, 64, 16), (20, 128, 128)], ids=str)
def test_quantising_norm_writes_the_same_rows_and_their_e4m3_groups(heads, dim, group, device):
    """With quant_block the output is unchanged (bit for bit) and carries the e4m3 groups that the
    quantisation kernel makes of each token's heads * dim features, which flatten_tokens keeps.
    20 heads of 128: more rows than one program's block, the last block partly empty."""
    from tests.kernels.test_add_rms_norm import assert_groups_of
    from worker.kernels.fp8.quant import flatten_tokens, per_token_group_quant_fp8

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32  # the interpreter's bf16 arithmetic overflows
    gen = generator(heads * dim, device)
    x = randn(5, heads, dim, gen=gen, device=device, dtype=dtype, scale=2.0)
    z = randn(5, heads * dim + 8, gen=gen, device=device, dtype=dtype)[:, 8:].view(5, heads, dim)
    weight = (1 + randn(dim, gen=gen, device=device, scale=0.1)).to(dtype)
    out = tk.gated_rms_norm(x, z, weight, 1e-6, quant_block=group)
    assert torch.equal(out, tk.gated_rms_norm(x, z, weight, 1e-6))
    assert_groups_of(flatten_tokens(out), group)
    ref_out = ref.gated_rms_norm(x, z, weight, 1e-6, quant_block=group)
    assert_groups_of(flatten_tokens(ref_out), group, per_token_group_quant_fp8)
    with pytest.raises(ValueError, match="cannot be quantised"):
        tk.gated_rms_norm(x, z, weight, 1e-6, quant_block=2 * dim)
