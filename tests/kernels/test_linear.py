"""The dense GEMV (worker.kernels.triton_linear) against F.linear, and its dispatch."""

import importlib
import json

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import generator, randn
from worker.kernels.moe.tile_configs import device_name

ref = importlib.import_module("worker.kernels.linear")
tk = pytest.importorskip("worker.kernels.triton_linear", reason="triton is not installed")

TILES = [dict(BN=4, BK=32, num_warps=2), dict(BN=1, BK=128, num_warps=1), dict(BN=8, BK=64, num_warps=4, num_stages=2)]


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("tile", TILES, ids=["bn4", "bn1-one-chunk", "bn8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemv_equals_linear(tokens, tile, dtype, device):
    gen = generator(3, device)
    n, k = 37, 100  # partial row and K tiles
    x = randn(tokens, k, gen=gen, device=device, dtype=dtype)
    w = randn(n, k, gen=gen, device=device, dtype=dtype, scale=k**-0.5)
    bias = randn(n, gen=gen, device=device, dtype=dtype)
    for b in (None, bias):
        got = tk.linear(x, w, b, tile=tile)
        want = ref.linear(x.float(), w.float(), None if b is None else b.float())
        assert got.dtype == dtype and got.shape == (tokens, n)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_gemv_rows_do_not_depend_on_the_other_tokens(device):
    """A token's row is the same alone and among others (one row's sum never mixes with another's)."""
    gen = generator(4, device)
    x = randn(5, 64, gen=gen, device=device)
    w = randn(24, 64, gen=gen, device=device)
    tile = dict(BN=4, BK=32, num_warps=2)
    together = tk.linear(x, w, tile=tile)
    for t in range(5):
        alone = tk.linear(x[t:t + 1], w, tile=tile)
        torch.testing.assert_close(alone[0], together[t], atol=1e-6, rtol=1e-6)


def test_leading_dims_and_strided_rows(device):
    gen = generator(5, device)
    x = randn(2, 3, 80, gen=gen, device=device)[:, :, :64]  # rows with a stride of 80
    w = randn(16, 64, gen=gen, device=device)
    got = tk.linear(x, w, tile=dict(BN=2, BK=64, num_warps=1))
    torch.testing.assert_close(got, ref.linear(x, w), atol=1e-5, rtol=1e-5)


def test_gemv_refuses_more_tokens_than_it_takes(device):
    x = torch.zeros(tk.GEMV_MAX_TOKENS + 1, 16, device=device)
    with pytest.raises(ValueError, match="at most"):
        tk.gemv(x, torch.zeros(4, 16, device=device), None, dict(BN=2, BK=16))


def test_dispatch_follows_the_tuned_table(tmp_path, monkeypatch, device):
    """A shape with a tuned GEMV tile takes it up to GEMV_MAX_TOKENS; 'cublas' entries, untuned shapes
    and more tokens go to F.linear."""
    n, k = 24, 48
    name = tk.config_file_name(n, k, torch.float32, device_name(torch.device(device)))
    (tmp_path / name).write_text(json.dumps({"1": dict(BN=4, BK=16, num_warps=1), "4": {"cublas": True}}))
    monkeypatch.setattr(tk, "CONFIG_DIR", tmp_path)
    tk.get_tile.cache_clear()
    calls = []
    real_gemv = tk.gemv
    monkeypatch.setattr(tk, "gemv", lambda *a: calls.append(a[3]) or real_gemv(*a))
    try:
        w = torch.ones(n, k, device=device)
        for tokens in (1, 2, 4, tk.GEMV_MAX_TOKENS + 1):
            out = tk.linear(torch.ones(tokens, k, device=device), w)
            assert torch.equal(out, torch.full((tokens, n), float(k), device=device))
        tk.linear(torch.ones(1, k, device=device), torch.ones(n + 1, k, device=device))  # untuned shape
        assert calls == [dict(BN=4, BK=16, num_warps=1)] * 2  # 1 and 2 tokens (2 is nearest to 1)
    finally:
        tk.get_tile.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2048, 4096), (12352, 2048), (513, 2048)], ids=["out_proj", "qkvz_ba", "router"])
def test_gemv_at_80b_shapes(shape):
    gen = generator(6, "cuda")
    n, k = shape
    w = randn(n, k, gen=gen, device="cuda", dtype=torch.bfloat16, scale=k**-0.5)
    for tokens in (1, 2, 4):
        x = randn(tokens, k, gen=gen, device="cuda", dtype=torch.bfloat16)
        want = ref.linear(x.float(), w.float())
        for tile in (dict(BN=1, BK=2048, num_warps=2), dict(BN=4, BK=512, num_warps=4)):
            torch.testing.assert_close(tk.linear(x, w, tile=tile).float(), want, atol=2e-2, rtol=2e-2)
