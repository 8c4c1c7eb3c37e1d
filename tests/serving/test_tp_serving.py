"""A tensor-parallel worker group behind the router: same tokens as one rank, and a dying rank takes
the group down cleanly."""

import time

import grpc
import pytest

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.processes import alive, child_pids, cmdline
from tests.serving.conftest import free_port, start_router, start_worker

PROMPTS = [[5, 17, 300, 42], list(range(100, 160))]


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory):
    from worker.tools.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tp"), preset="tiny-tp", dtype="float32")


def test_nextserve_serve_tp2_streams_the_single_rank_tokens(spawn, tp_model_dir, channel_to):
    from worker import LLM, SamplingParams

    expected = [o.token_ids for o in LLM(tp_model_dir, cache_memory_bytes=32 << 20).generate(
        PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))]
    worker_port, router_port = free_port(), free_port()
    serve = spawn(["serve", "--model", str(tp_model_dir), "-tp", "2", "-k", "2", "--host", "127.0.0.1",
                   "--port", str(router_port), "--worker-port", str(worker_port), "--cache-memory-mb", "64"], "serve")
    serve.wait_serving(f"127.0.0.1:{router_port}")
    stub = generation_pb2_grpc.GenerationStub(channel_to(router_port))
    info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest())
    assert (info.tensor_parallel_size, info.speculative_tokens) == (2, 2)
    for prompt, tokens in zip(PROMPTS, expected):
        chunks = list(stub.Generate(generation_pb2.GenerateRequest(token_ids=prompt, max_tokens=24, temperature=0.0,
                                                                   ignore_eos=True)))
        assert [t for c in chunks for t in c.token_ids] == tokens
        assert chunks[-1].speculative.drafted_tokens > 0


def test_killing_one_rank_takes_the_group_down(spawn, tp_model_dir, channel_to):
    worker_port, router_port = free_port(), free_port()
    worker = start_worker(spawn, tp_model_dir, worker_port, "-tp", "2")
    start_router(spawn, tp_model_dir, router_port, [worker_port])
    descendants = child_pids(worker.pid)
    ranks = [pid for pid in descendants if "worker.parallel.rank_main" in cmdline(pid)]
    assert len(ranks) == 1, [(cmdline(p)) for p in descendants]
    stub = generation_pb2_grpc.GenerationStub(channel_to(router_port))
    stream = stub.Generate(generation_pb2.GenerateRequest(token_ids=[1, 2, 3], max_tokens=4000, temperature=0.0,
                                                          ignore_eos=True))
    next(stream)
    import os
    import signal

    os.kill(ranks[0], signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    worker.proc.wait(10)
    assert time.monotonic() - killed_at < 10
    time.sleep(0.5)
    assert not [pid for pid in descendants if alive(pid)], "processes of the worker group outlived it"


def test_worker_exits_non_zero_naming_a_rank_that_dies_while_loading(spawn, tp_model_dir):
    """Not NOT_SERVING forever: the worker process exits with the rank, its exit code and its last lines."""
    started = time.monotonic()
    worker = spawn(["worker", "--model", str(tp_model_dir), "--port", str(free_port()), "--cache-memory-mb", "64",
                    "-tp", "2"], "worker", env={"NEXTSERVE_TEST_RANK_FAULT": "1:load:exit"})
    assert worker.proc.wait(60) != 0
    assert time.monotonic() - started < 30
    output = worker.output()
    assert "worker cannot start: tensor-parallel rank 1 exited with code 3 during start-up" in output, output[-3000:]
    assert "test fault: rank 1 fails at load" in output
