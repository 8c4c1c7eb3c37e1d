"""A tensor-parallel worker group behind the router: same tokens as one rank, and a dying rank takes
the group down cleanly."""

import time
from pathlib import Path

import grpc
import pytest

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.serving.conftest import free_port, start_router, start_worker

PROMPTS = [[5, 17, 300, 42], list(range(100, 160))]


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory):
    from worker.tools.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tp"), preset="tiny-tp", dtype="float32")


def _proc_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
    descendants = _proc_children(worker.pid)
    ranks = [pid for pid in descendants if "spawn_main" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)]
    assert len(ranks) == 1, [(_cmdline(p)) for p in descendants]
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
    assert not [pid for pid in descendants if _alive(pid)], "processes of the worker group outlived it"
