"""The next decode step's inputs from the step in flight: the Triton kernel against the reference."""

import importlib

import pytest
import torch

ref = importlib.import_module("worker.kernels.continue_decode")  # the package shadows it with the dispatcher
tk = pytest.importorskip("worker.kernels.triton_continue_decode", reason="triton is not installed")


@pytest.mark.parametrize("k", [0, 1, 3])
def test_continue_decode_inputs(k, device):
    n, q = 5, 1 + k
    token_ids = torch.arange(100, 100 + 8 * q, device=device).view(8, q)[:n]  # a bucket's rows, sliced
    num_accepted = torch.tensor([0, k, k // 2, 0, k], device=device)
    drafts = None if k == 0 else torch.arange(500, 500 + 8 * k, device=device).view(8, k)[:n]
    positions = (torch.tensor([7, 30, 2, 64, 11], device=device)[:, None] + torch.arange(q, device=device)).contiguous()
    outputs = []
    for impl in (ref, tk):
        buffers = torch.full((3, n * q), -7, dtype=torch.int64, device=device)
        impl.continue_decode_inputs(token_ids, num_accepted, drafts, positions, buffers[0], buffers[1, :n],
                                    buffers[2, :n])
        outputs.append(buffers)
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[1][0].view(n, q)[:, 0].tolist() == token_ids.gather(1, num_accepted[:, None]).squeeze(1).tolist()
    assert outputs[1][1, :n].tolist() == (positions[:, 0] + num_accepted + 1).tolist()
