"""The whole path over real sockets: client -> router -> worker, processes started by the tests."""

import concurrent.futures
import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.serving.conftest import free_port, start_router, start_worker

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture
def server(spawn, model_dir):
    """A worker and a router; -> (router port, worker port)."""
    worker_port, router_port = free_port(), free_port()
    start_worker(spawn, model_dir, worker_port)
    start_router(spawn, model_dir, router_port, [worker_port], "--max-in-flight", "96", "--max-queue", "64")
    return router_port, worker_port


def stub_for(channel_to, port):
    return generation_pb2_grpc.GenerationStub(channel_to(port))


def collect(stream):
    chunks = list(stream)
    return chunks, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def assert_pool_full(stub):
    """All KV blocks and GDN slot groups are back (the engine frees them at its next step boundary)."""
    deadline = time.monotonic() + 5
    while True:
        load = stub.GetModelInfo(generation_pb2.GetModelInfoRequest()).load
        full = (load.free_kv_blocks == load.total_kv_blocks and load.free_gdn_slot_groups == load.total_gdn_slot_groups
                and load.running_requests == 0 and load.waiting_requests == 0)
        if full or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert full, load


def test_streamed_greedy_tokens_equal_the_offline_api(server, channel_to, model_dir):
    from transformers import AutoTokenizer

    from worker import LLM, SamplingParams

    stub = stub_for(channel_to, server[0])
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (1, 7, 40, 150)]
    offline = LLM(model_dir, cache_memory_bytes=32 << 20).generate(
        prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt, expected in zip(prompts, offline):
        chunks, tokens, text = collect(stub.Generate(generation_pb2.GenerateRequest(
            token_ids=prompt, max_tokens=48, **GREEDY)))
        assert tokens == expected.token_ids
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
        final = chunks[-1]
        assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), 48)
    text_request = generation_pb2.GenerateRequest(text="Bonjour — 你好 😀", max_tokens=8, **GREEDY)
    _, tokens, _ = collect(stub.Generate(text_request))
    ids = tokenizer.encode("Bonjour — 你好 😀")
    assert tokens == LLM(model_dir, cache_memory_bytes=32 << 20).generate(
        [ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    assert_pool_full(stub)


def test_64_concurrent_streams_with_20_percent_cancelled(server, channel_to):
    stub = stub_for(channel_to, server[0])
    rng = random.Random(1)
    cancel = set(rng.sample(range(64), 13))
    results = {}

    def run(i):
        request = generation_pb2.GenerateRequest(token_ids=[rng.randrange(1000) for _ in range(5 + i)],
                                                 max_tokens=40 if i not in cancel else 2000, **GREEDY)
        stream = stub.Generate(request)
        count = 0
        try:
            for chunk in stream:
                count += len(chunk.token_ids)
                if i in cancel and count >= 3:
                    stream.cancel()
        except grpc.RpcError as e:
            results[i] = e.code()
            return
        results[i] = count

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(run, range(64)))
    assert all(results[i] == grpc.StatusCode.CANCELLED for i in cancel)
    assert all(results[i] == 40 for i in range(64) if i not in cancel)
    assert_pool_full(stub)


def test_deadline_exceeded_frees_the_memory(server, channel_to):
    stub = stub_for(channel_to, server[0])
    request = generation_pb2.GenerateRequest(token_ids=[1, 2, 3], max_tokens=3000, **GREEDY)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(request, timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_pool_full(stub)


def test_past_the_queue_bound_requests_are_refused(spawn, model_dir, channel_to):
    worker_port, router_port = free_port(), free_port()
    start_worker(spawn, model_dir, worker_port)
    start_router(spawn, model_dir, router_port, [worker_port], "--max-in-flight", "2", "--max-queue", "2")
    stub = stub_for(channel_to, router_port)
    request = generation_pb2.GenerateRequest(token_ids=[1, 2, 3], max_tokens=400, **GREEDY)
    codes = []
    lock = threading.Lock()

    def run(_):
        try:
            collect(stub.Generate(request, timeout=60))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        with lock:
            codes.append(code)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(run, range(10)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert codes.count(grpc.StatusCode.OK) >= 4
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert_pool_full(stub)


def test_killing_the_worker_gives_unavailable_then_serving_resumes(spawn, model_dir, channel_to):
    worker_port, router_port = free_port(), free_port()
    worker = start_worker(spawn, model_dir, worker_port)
    start_router(spawn, model_dir, router_port, [worker_port])
    channel = channel_to(router_port)
    stub = generation_pb2_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stream = stub.Generate(generation_pb2.GenerateRequest(token_ids=[1, 2, 3], max_tokens=4000, **GREEDY))
    next(stream)
    killed_at = time.monotonic()
    worker.signal(9)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed_at < 5
    status = health.Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(generation_pb2.GenerateRequest(token_ids=[1], max_tokens=2, **GREEDY)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    start_worker(spawn, model_dir, worker_port)
    deadline = time.monotonic() + 30
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "router did not reconnect to the restarted worker"
        time.sleep(0.2)
    _, tokens, _ = collect(stub.Generate(generation_pb2.GenerateRequest(token_ids=[1], max_tokens=4, **GREEDY)))
    assert len(tokens) == 4


def test_reflection_lists_the_public_service(server, channel_to):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel_to(server[0]))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "nextserve.v1.Generation" in names
