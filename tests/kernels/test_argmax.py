"""Greedy argmax: the Triton kernel against torch's, ties to the first index."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import generator, randn
ref = importlib.import_module("worker.kernels.argmax")  # the package shadows it with the dispatcher

tk = pytest.importorskip("worker.kernels.triton_argmax", reason="triton is not installed")


@pytest.mark.parametrize("shape", [(1, 5000), (3, 2, 700), (7, 1)], ids=["one-row", "rows-by-query", "width-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_argmax_with_ties(shape, dtype, device, monkeypatch):
    monkeypatch.setattr(tk, "MIN_CHUNK", 256)  # several chunks per row, and several steps per chunk
    monkeypatch.setattr(tk, "MAX_BLOCK", 64)
    logits = randn(*shape, gen=generator(1, device), device=device, dtype=dtype)
    flat = logits.view(-1, shape[-1])
    if shape[-1] > 600:  # each row's maximum twice, the later copy in another chunk
        top = flat.max(dim=-1).values
        flat[:, shape[-1] - 2] = top
        flat[:, 7] = top
    got = tk.argmax(logits)
    assert got.dtype == torch.int64 and got.shape == shape[:-1]
    assert torch.equal(got, ref.argmax(logits))


def test_rows_of_minus_infinity_give_the_first_index(device):
    logits = torch.full((2, 300), float("-inf"), device=device)
    logits[1, 100] = 0.0
    assert tk.argmax(logits).tolist() == [0, 100]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 64, 1024])
def test_argmax_vocabulary_rows_gpu(rows):
    logits = torch.randn(rows, 151936, device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
    logits = logits.to(torch.bfloat16)
    assert torch.equal(tk.argmax(logits), logits.argmax(dim=-1))
