"""Query/key norm + partial rotary + KV-cache write: the Triton kernel against the torch reference.

The caches start as NaN, so a slot written by mistake (a PAD token's) or left unwritten shows up;
the query comes as the strided half of q_proj's [query | gate] rows, as the model passes it.
"""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import PAD, assert_rel_close, generator, randn, tolerance
from worker.model.layers.rotary import PartialRotaryEmbedding

ref = importlib.import_module("worker.kernels.qk_norm_rope")
tk = pytest.importorskip("worker.kernels.triton_qk_norm_rope", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def check(tokens, heads, kv_heads, head_dim, rotary_dim, dtype, device, seed, block_size=16):
    gen = generator(seed, device)
    qg = randn(tokens, heads, 2 * head_dim, gen=gen, device=device, dtype=dtype, scale=3.0)
    query = qg.chunk(2, dim=-1)[0]  # strided, as q_proj's output gives it
    key = randn(tokens, kv_heads, head_dim, gen=gen, device=device, dtype=dtype, scale=3.0)
    value = randn(tokens, kv_heads, head_dim, gen=gen, device=device, dtype=dtype)
    q_w = randn(head_dim, gen=gen, device=device, scale=0.1).to(dtype)
    k_w = randn(head_dim, gen=gen, device=device, scale=0.1).to(dtype)
    cos_sin = PartialRotaryEmbedding(head_dim, rotary_dim, 10000.0, 8192).cos_sin.to(device)
    positions = torch.randint(0, 8192, (tokens,), generator=gen, device=device)
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:tokens]
    slots[::3] = PAD  # every third token writes nothing
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    args = dict(query=query, key=key, value=value, q_norm_weight=q_w, k_norm_weight=k_w, eps=1e-6, cos_sin=cos_sin,
                positions=positions, slot_mapping=slots)
    expected = ref.qk_norm_rope_and_cache(**args, k_cache=caches[0], v_cache=caches[1])
    out = tk.qk_norm_rope_and_cache(**args, k_cache=caches[2], v_cache=caches[3])
    assert out.dtype == dtype and out.shape == query.shape
    assert_rel_close(out, expected, tolerance(dtype), "query")
    for name, got, want in (("k_cache", caches[2], caches[0]), ("v_cache", caches[3], caches[1])):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: written slots differ"
        assert_rel_close(got, want, tolerance(dtype), name)


@pytest.mark.parametrize("tokens", [1, 7, 63])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 32, 8), (4, 1, 48, 24), (6, 2, 32, 32)],
                         ids=["rot8-of-32", "rot24-of-48-gqa4", "full-rotary"])
def test_qk_norm_rope_and_cache(tokens, heads, kv_heads, head_dim, rotary_dim, device):
    check(tokens, heads, kv_heads, head_dim, rotary_dim, torch.float32, device, seed=tokens + head_dim)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads,kv_heads", [(16, 2), (8, 1), (4, 1)], ids=["tp1", "tp2", "tp4"])
@pytest.mark.parametrize("tokens", [1, 7, 500, 4097])
def test_qk_norm_rope_and_cache_real_shapes(tokens, heads, kv_heads, dtype, device):
    check(tokens, heads, kv_heads, 256, 64, dtype, device, seed=tokens + heads)
