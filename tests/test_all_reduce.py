"""The tensor-parallel all-reduce on the CPU: two gloo ranks joined as the engine joins them.

Every rank's result is compared bitwise with torch.distributed's all-reduce, with the sum of the
ranks' inputs in rank order (recomputed here from the same seeds) and with the other rank's result;
`all_reduce_add_rms_norm` with the all-reduce followed by the torch reference add + norm. The choice
of the CUDA path runs here too, with a stand-in for the one-shot all-reduce, to show that the ranks
agree (one failing rank sends all to NCCL). The one-shot path itself: tests/gpu/test_all_reduce_gpu.py.
"""

import pickle
from typing import ClassVar
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.rank_process import leave_group_and_exit
from worker.distributed import tensor_parallel_as
from worker.kernels import add_rms_norm as ref
from worker.model.layers.checkpoint_tensor import CheckpointTensor
from worker.model.layers.linear import RowParallelLinear
from worker.parallel import all_reduce
from worker.parallel.all_reduce import NO_MULTICAST_ENV, GroupAllReduce, fits_one_shot, forbid_multicast

SIZE = 2
SHAPES = [((7, 130), torch.float32), ((1, 2048), torch.float32), ((5, 64), torch.bfloat16), ((3,), torch.float16)]
NORM_SHAPE, EPS = (9, 200), 1e-6
# (which rank fails which set-up step, --disable-custom-all-reduce) -> what every rank must choose
CHOICES = [({}, False), ({}, True), ({"support": 1}, False), ({"build": 0}, False), ({"self_test": 1}, False)]
CHOSEN = ["FakeOneShot", "GroupAllReduce", "GroupAllReduce", "GroupAllReduce", "GroupAllReduce"]


def partial_sum(rank: int, shape, dtype) -> torch.Tensor:
    """What rank `rank` holds before the reduction: a row-parallel output's partial sum."""
    gen = torch.Generator().manual_seed(1000 * rank + sum(shape))
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def norm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, weight): the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(NORM_SHAPE, generator=gen) * 4, torch.randn(NORM_SHAPE[-1], generator=gen) * 0.1


class FakeOneShot(GroupAllReduce):
    """Stands in for OneShotAllReduce (CUDA only) so the ranks' agreement runs on gloo: FAIL names the
    step ("support", "build", "self_test") that one rank fails."""

    FAIL: ClassVar[dict[str, int]] = {}

    def __init__(self, group, device):
        super().__init__(group)
        if self.FAIL.get("build") == dist.get_rank():
            raise RuntimeError("no peer memory on this rank")

    def multicast_ptr(self) -> int:
        return 0

    def self_test(self) -> str | None:
        return "a wrong sum" if self.FAIL.get("self_test") == dist.get_rank() else None


def choice_when(rank: int, fail: dict[str, int], disable_custom: bool = False) -> str:
    def unsupported(device, size):
        return "no symmetric memory" if fail.get("support") == rank else None

    FakeOneShot.FAIL = fail
    with mock.patch.object(all_reduce, "OneShotAllReduce", FakeOneShot), \
            mock.patch.object(all_reduce, "_why_unsupported", unsupported):
        chosen = all_reduce.choose_all_reduce(dist.group.WORLD, torch.device("cuda", rank), dist.group.WORLD,
                                              disable_custom)
    return type(chosen).__name__


def _rank(rank: int, port: int, results) -> None:
    import os

    from worker.distributed import get_tp
    from worker.engine.config import EngineConfig
    from worker.parallel.group import connect_store, join_group

    torch.set_num_threads(1)
    join_group(EngineConfig(model="unused", tensor_parallel_size=SIZE), rank, connect_store(rank, port))
    tp = get_tp()
    out = {"reducer": type(tp.reducer).__name__, "env": {name: os.environ.get(name) for name in NO_MULTICAST_ENV}}
    for shape, dtype in SHAPES:
        expected = partial_sum(rank, shape, dtype)
        dist.all_reduce(expected)
        out[("all_reduce", shape)] = (tp.all_reduce(partial_sum(rank, shape, dtype)), expected)
    residual, weight = norm_inputs()
    reduced = partial_sum(rank, NORM_SHAPE, torch.float32)
    dist.all_reduce(reduced)
    out["norm"] = (tp.all_reduce_add_rms_norm(partial_sum(rank, NORM_SHAPE, torch.float32), residual, weight, EPS),
                   ref.fused_add_rms_norm(reduced, residual, weight, EPS))
    out["choices"] = [choice_when(rank, fail, disable) for fail, disable in CHOICES]
    results.put((rank, pickle.dumps(out)))  # plain bytes: tensors in a queue would live in this process's memory
    leave_group_and_exit(results)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    from tests.serving.conftest import free_port

    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank, args=(r, port, results)) for r in range(SIZE)]
    for p in processes:
        p.start()
    by_rank = {rank: pickle.loads(out) for rank, out in (results.get(timeout=120) for _ in processes)}
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    return [by_rank[r] for r in range(SIZE)]


def test_the_engine_group_reduces_through_gloo_with_multicast_off(ranks):
    for out in ranks:
        assert out["reducer"] == "GroupAllReduce"
        assert out["env"] == NO_MULTICAST_ENV


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_all_reduce_is_the_rank_order_sum_bitwise_on_every_rank(ranks, shape, dtype):
    in_rank_order = partial_sum(0, shape, dtype)
    for rank in range(1, SIZE):
        in_rank_order = in_rank_order + partial_sum(rank, shape, dtype)
    for out in ranks:
        got, expected = out[("all_reduce", shape)]
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, expected)
        assert torch.equal(got, in_rank_order)


def test_all_reduce_add_rms_norm_is_the_all_reduce_then_the_reference_norm(ranks):
    for out in ranks:
        (normed, new_residual), (expected_normed, expected_residual) = out["norm"]
        assert torch.equal(new_residual, expected_residual)
        assert torch.equal(normed, expected_normed)
    assert torch.equal(ranks[0]["norm"][0][0], ranks[1]["norm"][0][0])


def test_every_rank_takes_the_one_shot_path_or_every_rank_falls_back(ranks):
    """A rank that cannot set it up (at any step) makes all of them use NCCL, without a hang."""
    for out in ranks:
        assert out["choices"] == CHOSEN


def test_forbid_multicast_overrides_what_was_set():
    environ = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    forbid_multicast(environ)
    assert environ == {**NO_MULTICAST_ENV, "PATH": "/bin"}


def test_one_shot_takes_small_aligned_bf16_and_fp32_only():
    x = torch.empty(16, 2048, dtype=torch.bfloat16)  # 64 KB
    assert fits_one_shot(x, 64 << 10) and fits_one_shot(x.float()[:8], 64 << 10)
    assert not fits_one_shot(torch.empty(16, 2049, dtype=torch.bfloat16), 64 << 10)  # over 64 KB
    assert not fits_one_shot(x.half(), 64 << 10)
    assert not fits_one_shot(x[:, :3], 64 << 10)  # not contiguous
    assert not fits_one_shot(torch.empty(3, dtype=torch.bfloat16), 64 << 10)  # 6 bytes
    assert not fits_one_shot(torch.empty(12)[2:], 64 << 10)  # 8-byte offset
    assert not fits_one_shot(torch.empty(0), 64 << 10)


def test_unreduced_row_parallel_shards_sum_to_the_whole_layer_with_its_bias_once():
    """reduce_results=False leaves the sum to the norm after it; the bias must be in it once (rank 0's)."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(24, 64, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    layers = []
    for rank, size in [(0, 1), (0, SIZE), (1, SIZE)]:
        with tensor_parallel_as(rank, size):
            layer = RowParallelLinear(64, 24, bias=True, reduce_results=False)
        for param, tensor in ((layer.weight, weight), (layer.bias, bias)):
            param.weight_loader(param, CheckpointTensor.from_tensor(tensor))
        layers.append(layer)
    whole, ranks = layers[0], layers[1:]
    partial = sum(layer(x[:, 32 * rank : 32 * (rank + 1)]) for rank, layer in enumerate(ranks))
    torch.testing.assert_close(partial, whole(x), rtol=1e-5, atol=1e-5)


class FakeSymmetricMemory:
    """torch's symmetric memory for two ranks in one process, on the CPU: `empty` gives each rank's buffer
    in turn, and every rank's handle views any rank's buffer (get_buffer), as peer memory would."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def empty(self, size, dtype, device):
        self.buffers.append(torch.zeros(size, dtype=dtype))
        return self.buffers[-1]

    def rendezvous(self, buffer, group):
        return self

    def barrier(self, channel: int = 0):
        pass

    def get_buffer(self, rank, sizes, dtype, storage_offset=0):
        numel = torch.Size(sizes).numel()
        return self.buffers[rank].view(dtype)[storage_offset : storage_offset + numel].view(sizes)


def fused_reducers(world: int, max_bytes: int) -> tuple[list, FakeSymmetricMemory]:
    """OneShotAllReduce of each rank over FakeSymmetricMemory, with the fused add + norm on."""
    from torch.distributed import _symmetric_memory as symm_mem

    memory, reducers = FakeSymmetricMemory(), []
    group = mock.Mock(group_name="fake")
    for rank in range(world):
        with mock.patch.object(symm_mem, "empty", memory.empty), \
                mock.patch.object(symm_mem, "rendezvous", memory.rendezvous), \
                mock.patch.object(torch.cuda, "synchronize"), \
                mock.patch.object(all_reduce, "one_shot_norm_enabled", lambda: True), \
                mock.patch.object(all_reduce.dist, "get_world_size", lambda group: world):
            reducers.append(all_reduce.OneShotAllReduce(group, torch.device("cpu"), max_bytes=max_bytes))
        reducers[-1].rank = rank
    return reducers, memory


def peer_rows_of(reducer, x, residual):
    with mock.patch.object(all_reduce.dist, "get_world_size", lambda group: len(reducer.handle.buffers)), \
            mock.patch.object(all_reduce.dist, "get_rank", lambda group: reducer.rank):
        return reducer._peer_rows(x, residual)


def test_the_fused_rows_and_flags_lie_past_torchs_part_of_the_symmetric_buffer():
    max_bytes, hidden = 4096, 64  # fp32 rows of 256 bytes: 16 in each half
    (r0, r1), memory = fused_reducers(2, max_bytes)
    assert r0.buffer.numel() == 3 * max_bytes + (max_bytes // 16) * 2 * 4
    x = torch.zeros(5, hidden)
    peers = peer_rows_of(r1, x, x)
    assert peers.rank == 1 and peers.max_rows == max_bytes // (hidden * 4)
    base = [b.data_ptr() for b in memory.buffers]
    for p in range(2):
        assert peers.rows[p].data_ptr() == base[p] + max_bytes  # after torch's one-shot part
        assert peers.rows[p].shape == (2, 16, hidden)
        assert peers.flags[p].data_ptr() == base[p] + 3 * max_bytes  # after both halves of the rows
        assert peers.flags[p].shape == (16, 2)
    assert peers.row_ptrs.tolist() == [base[0] + max_bytes, base[1] + max_bytes]
    assert peer_rows_of(r1, x, x) is peers  # laid out once


def test_rows_the_fused_kernel_cannot_take_go_the_unfused_way():
    (r0, _), _ = fused_reducers(2, 4096)
    x = torch.zeros(2, 64)
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True), \
            mock.patch.object(torch.Tensor, "is_cuda", True):
        assert peer_rows_of(r0, x, x) is None  # not laid out while a graph is being captured
    assert peer_rows_of(r0, x, x) is not None
    for other in (torch.zeros(17, 64), torch.zeros(2, 32), torch.zeros(2, 64, dtype=torch.bfloat16),
                  torch.zeros(2, 64, dtype=torch.float16), torch.zeros(64, 2).t()):
        assert peer_rows_of(r0, other, other) is None, other.shape
    assert peer_rows_of(r0, x, torch.zeros(64, 2).t()) is None  # a residual with strided rows


def test_the_fused_path_runs_the_one_shot_kernel_and_the_unfused_path_the_all_reduce_then_the_norm():
    (r0, _), _ = fused_reducers(2, 4096)
    x, weight = torch.ones(2, 64), torch.zeros(64)
    calls = []

    def all_reduce_only(self, x):
        calls.append("all_reduce")
        return x

    with mock.patch.object(all_reduce.kernels, "one_shot_add_rms_norm", lambda *a: calls.append("fused")), \
            mock.patch.object(all_reduce.OneShotAllReduce, "all_reduce", all_reduce_only), \
            mock.patch.object(all_reduce.dist, "get_world_size", lambda group: 2), \
            mock.patch.object(all_reduce.dist, "get_rank", lambda group: 0):
        r0.all_reduce_add_rms_norm(x, x, weight, EPS)
        r0.all_reduce_add_rms_norm(torch.ones(17, 64), torch.ones(17, 64), weight, EPS)
        r0.fuse_norm = False
        r0.all_reduce_add_rms_norm(x, x, weight, EPS)
    assert calls == ["fused", "all_reduce", "all_reduce"]
