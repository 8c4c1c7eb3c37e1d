"""The one-shot all-reduce over peer memory against NCCL at tp 2 (run on a 2-GPU device machine).

At two ranks both compute round(a + b) of the same two numbers, so they must agree bitwise: eagerly
and replayed from a CUDA graph, below and above the 64 KB switch to NCCL, in bf16 and fp32; and the
engine's greedy tokens and logprobs must be the same bits with the custom all-reduce on and off.

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
    results.put((rank, pickle.dumps(out)))
    dist.barrier(group=plan_group)
    dist.destroy_process_group()


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
