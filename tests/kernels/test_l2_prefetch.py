"""kernels.prefetch_l2: a hint that changes no value. The reference does nothing; the Triton op
launches only where bulk prefetch exists (sm_90+, not the interpreter), in CUDA graphs too."""

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from worker import kernels

tp = pytest.importorskip("worker.kernels.triton_l2_prefetch", reason="triton is not installed")


def test_region_covers_contiguous_aligned_tensors_only():
    base = torch.zeros(64, 32)
    assert tp._region(base) == (base.data_ptr(), 64 * 32 * 4)
    assert tp._region(base[:, :16])[1] == 0  # not contiguous
    assert tp._region(base.view(-1)[1:])[1] == 0  # 4 bytes past an aligned start
    assert tp._region(base[:0])[1] == 0


def test_nothing_launches_without_bulk_prefetch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no launch expected")

    monkeypatch.setattr(tp, "_launch", refuse)
    assert not tp.prefetch_enabled(torch.device("cpu"))
    tp.prefetch_l2(torch.ones(8))
    kernels.prefetch_l2(torch.ones(8))


def test_off_switch(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_L2_PREFETCH", "0")
    tp.prefetch_enabled.cache_clear()
    try:
        assert not tp.prefetch_enabled(torch.device("cuda", 0))
    finally:
        tp.prefetch_enabled.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_prefetch_keeps_values_and_replays_in_a_graph():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk prefetch needs sm_90")
    assert tp.prefetch_enabled(torch.device("cuda", 0))
    gen = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(3000, 1000, device="cuda", generator=gen)  # 12 MB: many programs, a partial last chunk
    fp8 = big[:512].to(torch.float8_e4m3fn)
    odd = torch.randn(7, device="cuda", generator=gen)  # 28 bytes: rounded down to 16
    tensors = [big, fp8, odd, big[:, :5], big.view(-1)[3:], torch.empty(0, device="cuda")]
    before = [t.clone() for t in tensors]
    x = torch.randn(1000, device="cuda", generator=gen)
    expected = big @ x
    kernels.prefetch_l2(*tensors)  # six tensors: two launches
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        kernels.prefetch_l2(big, fp8)  # warm-up outside capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph, stream=stream):
                kernels.prefetch_l2(big, fp8, odd)
                out = big @ x
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    for t, b in zip(tensors, before):
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
