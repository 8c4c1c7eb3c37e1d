"""Both /metrics endpoints after known traffic: counters and histograms moved by exactly that traffic."""

import math

import grpc
import pytest

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.deploy.conftest import scrape, wait_idle
from worker.tools.tiny_checkpoint import TINY_MODEL_NAME

PROMPT_LENGTHS = [3, 5, 7, 9]
MAX_TOKENS = [4, 5, 6, 7]
K = 2  # the shared worker's speculative tokens


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def traffic(stack):
    """Four greedy requests of known size and one invalid one; -> (router before, after, worker before, after)."""
    wait_idle(stack.router_address)
    router_before, worker_before = scrape(stack.router_metrics_port), scrape(stack.worker_metrics_port)
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for n, max_tokens in zip(PROMPT_LENGTHS, MAX_TOKENS):
            request = generation_pb2.GenerateRequest(token_ids=list(range(10, 10 + n)), max_tokens=max_tokens,
                                                     temperature=0.0, ignore_eos=True)
            assert sum(len(chunk.token_ids) for chunk in stub.Generate(request, timeout=30)) == max_tokens
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(generation_pb2.GenerateRequest(text="hi", temperature=-1.0), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_idle(stack.router_address)
    return router_before, scrape(stack.router_metrics_port), worker_before, scrape(stack.worker_metrics_port)


def test_router_metrics_count_the_traffic(traffic):
    before, after, _, _ = traffic
    requests = "nextserve_router_requests_total"
    assert delta(before, after, requests, method="Generate", code="OK") == len(MAX_TOKENS)
    assert delta(before, after, requests, method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "nextserve_router_prompt_tokens_total") == sum(PROMPT_LENGTHS)
    assert delta(before, after, "nextserve_router_generation_tokens_total") == sum(MAX_TOKENS)
    assert delta(before, after, "nextserve_router_time_to_first_token_seconds_count") == len(MAX_TOKENS)
    assert delta(before, after, "nextserve_router_request_duration_seconds_count") == len(MAX_TOKENS)
    # Every token after a request's first comes with a gap.
    itl_count = delta(before, after, "nextserve_router_inter_token_latency_seconds_count")
    assert itl_count == sum(MAX_TOKENS) - len(MAX_TOKENS)
    assert delta(before, after, "nextserve_router_time_to_first_token_seconds_sum") > 0
    assert delta(before, after, "nextserve_router_time_to_first_token_seconds_bucket", le="+Inf") == len(MAX_TOKENS)
    assert value(after, "nextserve_router_requests_in_flight") == value(after, "nextserve_router_requests_queued") == 0
    assert value(after, "nextserve_router_workers_ready") == value(after, "nextserve_router_workers") == 1
    assert delta(before, after, requests, method="GetModelInfo", code="OK") >= 1  # the idle check


def test_worker_metrics_count_the_traffic(traffic, stack):
    _, _, before, after = traffic
    assert delta(before, after, "nextserve_worker_prompt_tokens_total") == sum(PROMPT_LENGTHS)  # the bad one never came
    assert delta(before, after, "nextserve_worker_generation_tokens_total") == sum(MAX_TOKENS)
    assert delta(before, after, "nextserve_worker_requests_finished_total", reason="length") == len(MAX_TOKENS)
    assert delta(before, after, "nextserve_worker_requests_finished_total", reason="abort") == 0
    steps = delta(before, after, "nextserve_worker_steps_total")
    assert steps >= max(MAX_TOKENS) // (1 + K)
    assert delta(before, after, "nextserve_worker_step_duration_seconds_count") == steps
    assert delta(before, after, "nextserve_worker_step_duration_seconds_sum") > 0
    assert delta(before, after, "nextserve_worker_batched_tokens_total") >= sum(PROMPT_LENGTHS) + sum(MAX_TOKENS) - 4

    verify = delta(before, after, "nextserve_worker_spec_verify_steps_total")
    assert sum(math.ceil((m - 1) / (1 + K)) for m in MAX_TOKENS) <= verify <= sum(m - 1 for m in MAX_TOKENS)
    assert delta(before, after, "nextserve_worker_spec_drafted_tokens_total") == K * verify
    by_position = [delta(before, after, "nextserve_worker_spec_accepted_tokens_by_position_total", position=str(j))
                   for j in range(1, K + 1)]
    assert delta(before, after, "nextserve_worker_spec_accepted_tokens_total") == sum(by_position)
    assert by_position == sorted(by_position, reverse=True)  # position 2 is accepted only after position 1
    for j in range(1, K + 1):
        assert 0 <= value(after, "nextserve_worker_spec_acceptance_rate", position=str(j)) <= 1

    info = wait_idle(stack.router_address)
    assert value(after, "nextserve_worker_kv_blocks") == info.load.total_kv_blocks
    assert value(after, "nextserve_worker_gdn_slot_groups") == info.load.total_gdn_slot_groups
    for gauge in ("kv_blocks_used", "gdn_slot_groups_used", "running_sequences", "waiting_sequences",
                  "kv_cache_usage_ratio"):
        assert value(after, f"nextserve_worker_{gauge}") == 0, gauge
    assert value(after, "nextserve_worker_model_info", dtype="float32", model=TINY_MODEL_NAME,
                 speculative_tokens=str(K), tensor_parallel_size="1") == 1


def test_each_metrics_object_has_its_own_registry():
    """Several routers / workers in one process (as in tests) must not collide in a global registry."""
    from prometheus_client import generate_latest

    from router.metrics import RouterMetrics
    from worker.engine.llm_engine import EngineCounters
    from worker.server.metrics import WorkerMetrics

    class Engine:
        counters = EngineCounters(num_verify_steps=4, accepted_per_position=[3, 1])

        @staticmethod
        def stats():
            return {"num_running": 1, "num_waiting": 2, "num_free_blocks": 6, "num_blocks": 8,
                    "num_free_state_groups": 3, "num_state_groups": 4, "num_preemptions": 5}

    first, second = RouterMetrics(), RouterMetrics()
    first.requests.labels("Generate", "OK").inc()
    assert b'code="OK"' in generate_latest(first.registry) and b'code="OK"' not in generate_latest(second.registry)
    workers = [WorkerMetrics(), WorkerMetrics()]
    for metrics in workers:
        metrics.track(Engine(), {"model": "m"})
    text = generate_latest(workers[1].registry).decode()
    assert 'nextserve_worker_spec_acceptance_rate{position="1"} 0.75' in text
    assert 'nextserve_worker_spec_acceptance_rate{position="2"} 0.25' in text
    assert "nextserve_worker_kv_blocks_used 2.0" in text and "nextserve_worker_preemptions_total 5.0" in text
