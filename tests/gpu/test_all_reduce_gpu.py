"""The one-shot all-reduce over peer memory against NCCL at tp 2 (run on a 2-GPU device machine).

At two ranks both compute round(a + b) of the same two numbers, so they must agree bitwise: eagerly
and replayed from a CUDA graph, below and above the 64 KB switch to NCCL, in bf16 and fp32; and the
engine's greedy tokens and logprobs must be the same bits with the custom all-reduce on and off. The
one-shot kernel that also adds and normalises (NEXTSERVE_ONE_SHOT_NORM) must give the unfused path's
bits, eagerly and from graphs replayed many times, and so must the engine with it.

Not run yet: written without a GPU (no 2-GPU machine was lent); the CPU tests are tests/test_all_reduce.py.
"""

import pickle

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine_helpers import make_prompts
from worker import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

SIZE = 2
# Values per message: 1 token of bf16 hidden 2048 (4 KB), 16 tokens (64 KB, the last one-shot size),
# odd counts (bf16: not whole 4-byte words, so NCCL), 64 KB + 4 bytes and 1 MB (NCCL).
NUMELS = [1, 3, 2048, 2047, 16 * 2048, 16 * 2048 + 2, 1 << 19]
DTYPES = [torch.bfloat16, torch.float32]
NORM_TOKENS = [1, 4, 16, 17]  # 16 rows of 2048 bf16 fill a half of the fused kernel's rows; 17 go unfused
NORM_REPLAYS = 50


def partial_sum(rank: int, numel: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + numel)
    return (torch.randn(numel, generator=gen) * 3).to(dtype).to(device)


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from worker.distributed import get_tp
    from worker.engine.config import EngineConfig
    from worker.parallel.all_reduce import choose_all_reduce
    from worker.parallel.group import connect_store, join_group

    plan_group = join_group(EngineConfig(model="unused", device="cuda", tensor_parallel_size=SIZE), rank,
                            connect_store(rank, port))
    device = torch.device("cuda", rank)
    tp = get_tp()
    out = {"reducer": type(tp.reducer).__name__,
           "disabled": type(choose_all_reduce(dist.group.WORLD, device, plan_group, disable_custom=True)).__name__}
    for dtype in DTYPES:
        for numel in NUMELS:
            nccl = partial_sum(rank, numel, dtype, device)
            dist.all_reduce(nccl)
            eager = tp.all_reduce(partial_sum(rank, numel, dtype, device))
            static_in, work = partial_sum(rank, numel, dtype, device), torch.empty(numel, dtype=dtype, device=device)
            work.copy_(static_in)
            tp.all_reduce(work)  # NCCL's communicator is up before the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                work.copy_(static_in)
                tp.all_reduce(work)
            work.zero_()
            graph.replay()
            graph.replay()  # twice: the buffer and the flags are reused
            torch.cuda.synchronize()
            out[(dtype, numel)] = (nccl.cpu(), eager.cpu(), work.cpu())
    out["fused_self_test"] = fused_self_test(tp.reducer)
    for dtype in DTYPES:
        for tokens in NORM_TOKENS:
            out[("norm", dtype, tokens)] = fused_and_unfused_norm(tp.reducer, rank, tokens, dtype, device)
    results.put((rank, pickle.dumps(out)))
    dist.barrier(group=plan_group)
    dist.destroy_process_group()


def fused_self_test(reducer) -> str:
    reducer.fuse_norm = True
    try:
        return reducer.self_test() or "ok"
    finally:
        reducer.fuse_norm = False


def fused_and_unfused_norm(reducer, rank: int, tokens: int, dtype, device) -> dict:
    """all_reduce_add_rms_norm of the same rows unfused, fused eagerly, and fused in a graph replayed
    NORM_REPLAYS times over new rows each time (the last replay's result)."""
    reducer.drop_rows()  # laid out anew for this dtype
    hidden = 2048
    gen = torch.Generator().manual_seed(7)
    residual = (torch.randn(tokens, hidden, generator=gen) * 4).to(dtype).to(device)
    weight = (torch.randn(hidden, generator=gen) * 0.1).to(dtype).to(device)

    def rows(i: int) -> torch.Tensor:
        return partial_sum(rank + 2 * i, tokens * hidden, dtype, device).view(tokens, hidden)

    def norm(x, fused: bool):
        reducer.fuse_norm = fused
        try:
            return [t.clone() for t in reducer.all_reduce_add_rms_norm(x, residual, weight, 1e-6)]
        finally:
            reducer.fuse_norm = False

    out = {"unfused": norm(rows(0), False), "fused": norm(rows(0), True)}
    static_x = rows(1)
    norm(static_x, True)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    reducer.fuse_norm = True
    with torch.cuda.graph(graph):
        static_out = reducer.all_reduce_add_rms_norm(static_x, residual, weight, 1e-6)
    reducer.fuse_norm = False
    for i in range(NORM_REPLAYS):
        static_x.copy_(rows(i))
        graph.replay()
    torch.cuda.synchronize()
    out["graphed"] = [t.clone() for t in static_out]
    out["graphed_unfused"] = norm(rows(NORM_REPLAYS - 1), False)
    return {k: [t.cpu() for t in v] for k, v in out.items()}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    from tests.serving.conftest import free_port

    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank, args=(r, port, results)) for r in range(SIZE)]
    for p in processes:
        p.start()
    by_rank = {rank: pickle.loads(out) for rank, out in (results.get(timeout=300) for _ in processes)}
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    return [by_rank[r] for r in range(SIZE)]


def test_the_one_shot_path_is_chosen_unless_disabled(ranks):
    for out in ranks:
        assert out["reducer"] == "OneShotAllReduce"
        assert out["disabled"] == "GroupAllReduce"


@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_one_shot_equals_nccl_bitwise_on_every_rank_eager_and_in_graphs(ranks, dtype, numel):
    in_rank_order = partial_sum(0, numel, dtype) + partial_sum(1, numel, dtype)
    for out in ranks:
        nccl, eager, graphed = out[(dtype, numel)]
        assert torch.equal(nccl, in_rank_order)
        assert torch.equal(eager, nccl)
        assert torch.equal(graphed, nccl)


def test_the_fused_kernel_passes_its_self_test(ranks):
    assert [out["fused_self_test"] for out in ranks] == ["ok"] * SIZE


@pytest.mark.parametrize("tokens", NORM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_the_fused_add_norm_gives_the_unfused_bits_on_every_rank_eager_and_in_graphs(ranks, dtype, tokens):
    for out in ranks:
        got = out[("norm", dtype, tokens)]
        for name in ("fused", "unfused", "graphed", "graphed_unfused"):
            assert not torch.isnan(got[name][0]).any(), name
        for a, b in zip(got["fused"], got["unfused"]):
            assert torch.equal(a, b)
        for a, b in zip(got["graphed"], got["graphed_unfused"]):
            assert torch.equal(a, b)
    for name in ("fused", "graphed"):
        for a, b in zip(ranks[0][("norm", dtype, tokens)][name], ranks[1][("norm", dtype, tokens)][name]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_outputs_are_the_same_bits_with_the_custom_all_reduce_on_and_off(checkpoint_factory, dtype):
    """Through the CUDA graphs (on by default); decode messages of the tiny model are all one-shot."""
    model_dir = checkpoint_factory("tiny-tp")
    prompts = [[t % 700 for t in p] for p in make_prompts([1, 9, 64, 200], seed=21)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5)
    outputs = []
    for disable in (False, True):
        with LLM(model_dir, device="cuda", dtype=dtype, tensor_parallel_size=2, speculative_tokens=2,
                 gpu_memory_utilization=0.5, disable_custom_all_reduce=disable) as llm:
            outputs.append(llm.generate(prompts, params, use_tqdm=False))
    one_shot, nccl = outputs
    assert [o.token_ids for o in one_shot] == [o.token_ids for o in nccl]
    assert [o.logprobs for o in one_shot] == [o.logprobs for o in nccl]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_outputs_are_the_same_bits_with_the_fused_add_norm_on_and_off(checkpoint_factory, monkeypatch, dtype):
    """Through the CUDA graphs; the rank processes read NEXTSERVE_ONE_SHOT_NORM from the environment they
    inherit, and this process (rank 0) rereads it."""
    from worker.distributed import get_tp
    from worker.parallel.all_reduce import one_shot_norm_enabled

    model_dir = checkpoint_factory("tiny-tp")
    prompts = [[t % 700 for t in p] for p in make_prompts([1, 9, 64, 200], seed=22)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5)
    outputs = []
    for fused in ("1", "0"):
        monkeypatch.setenv("NEXTSERVE_ONE_SHOT_NORM", fused)
        one_shot_norm_enabled.cache_clear()
        with LLM(model_dir, device="cuda", dtype=dtype, tensor_parallel_size=2, speculative_tokens=2,
                 gpu_memory_utilization=0.5) as llm:
            outputs.append(llm.generate(prompts, params, use_tqdm=False))
            reducer = get_tp().reducer  # rank 0's: the fused kernel's rows are laid out once it has run
            assert reducer.fuse_norm == (fused == "1") and (reducer.peer_rows is not None) == reducer.fuse_norm
    fused_out, unfused_out = outputs
    assert [o.token_ids for o in fused_out] == [o.token_ids for o in unfused_out]
    assert [o.logprobs for o in fused_out] == [o.logprobs for o in unfused_out]
    one_shot_norm_enabled.cache_clear()
