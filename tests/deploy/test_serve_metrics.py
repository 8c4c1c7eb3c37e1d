"""`nextserve serve --metrics-port`: one endpoint with the router's and the worker's metrics."""

import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.deploy.conftest import scrape
from tests.serving.conftest import Process, free_port
from worker.combined_metrics import CombinedMetrics


def _families(port: int) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


@pytest.fixture
def two_pages():
    """Two /metrics pages like the router's and the worker's; -> their ports."""
    servers, ports = [], []
    for name, kind in (("nextserve_router_things", Counter), ("nextserve_worker_level", Gauge)):
        registry = CollectorRegistry()
        metric = kind(name, "a test metric", registry=registry)
        metric.inc(3)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        ports.append(server.server_port)
    yield ports
    for server in servers:
        server.shutdown()
        server.server_close()


def test_one_page_holds_both_and_says_which_answered(two_pages):
    router_port, worker_port = two_pages
    gone = free_port()  # nothing listens there
    combined = CombinedMetrics({"router": f"http://127.0.0.1:{router_port}/metrics",
                                "worker": f"http://127.0.0.1:{worker_port}/metrics",
                                "missing": f"http://127.0.0.1:{gone}/metrics"})
    port = combined.bind("127.0.0.1", 0)
    combined.start()
    try:
        families = _families(port)
    finally:
        combined.close()
    assert families["nextserve_router_things"][()] == 3
    assert families["nextserve_worker_level"][()] == 3
    up = families["nextserve_serve_target_up"]
    assert up == {(("target", "router"),): 1, (("target", "worker"),): 1, (("target", "missing"),): 0}


def test_serve_metrics_port_serves_router_and_worker(tmp_path, builtin_model):
    grpc_port, metrics_port = free_port(), free_port()
    server = Process(["serve", "--model", str(builtin_model), "--host", "127.0.0.1", "--port", str(grpc_port),
                      "--metrics-port", str(metrics_port), "-k", "1", "--cache-memory-mb", "64"],
                     tmp_path / "serve.log")
    try:
        server.wait_serving(f"127.0.0.1:{grpc_port}")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = generation_pb2.GenerateRequest(token_ids=[10, 11, 12], max_tokens=6, temperature=0.0,
                                                     ignore_eos=True)
            assert sum(len(c.token_ids) for c in generation_pb2_grpc.GenerationStub(channel).Generate(request)) == 6
        samples = scrape(metrics_port)
        server.wait_for_output(f"metrics http://127.0.0.1:{metrics_port}/metrics")  # the ready line
    finally:
        server.stop()
    assert samples[("nextserve_router_requests_total", (("code", "OK"), ("method", "Generate")))] == 1
    assert samples[("nextserve_worker_generation_tokens_total", ())] >= 6
    assert samples[("nextserve_worker_spec_drafted_tokens_total", ())] > 0
    assert ("nextserve_worker_spec_acceptance_rate", (("position", "1"),)) in samples
    assert samples[("nextserve_serve_target_up", (("target", "router"),))] == 1
    assert samples[("nextserve_serve_target_up", (("target", "worker"),))] == 1
