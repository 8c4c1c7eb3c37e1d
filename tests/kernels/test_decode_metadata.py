"""Decode-step metadata (positions, KV slots, context lengths): the Triton kernel against the reference."""

import importlib

import pytest
import torch

ref = importlib.import_module("worker.kernels.decode_metadata")
tk = pytest.importorskip("worker.kernels.triton_decode_metadata", reason="triton is not installed")


@pytest.mark.parametrize("query_len", [1, 3, 4])
@pytest.mark.parametrize("with_valid", [False, True], ids=["all-real", "padded"])
def test_decode_metadata(query_len, with_valid, device):
    gen = torch.Generator().manual_seed(query_len)
    block_size, num_seqs, max_blocks = 16, 7, 9
    start = torch.randint(0, max_blocks * block_size - query_len, (num_seqs,), generator=gen)
    tables = torch.randperm(200, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks).int()
    valid = torch.tensor([True, False, True, True, False, True, True]) if with_valid else None
    args = [t.to(device) if t is not None else None for t in (start, tables, valid)]
    got = tk.decode_metadata(*args, query_len, block_size)
    expected = ref.decode_metadata(*args, query_len, block_size)
    for name, a, b in zip(("positions", "slots", "context_lens"), got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if with_valid:
        assert (got[1][~args[2]] == ref.PAD_SLOT).all()


