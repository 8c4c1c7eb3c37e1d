"""One worker (k=2, so the speculative metrics move) and one router, both with /metrics, shared by the
deployment tests; they run as real `nextserve` processes on free loopback ports."""

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.serving.conftest import Process, free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    worker: Process
    router: Process
    worker_port: int
    router_port: int
    worker_metrics_port: int
    router_metrics_port: int

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    @property
    def worker_address(self) -> str:
        return f"127.0.0.1:{self.worker_port}"


@pytest.fixture(scope="session")
def builtin_model():
    from worker.tools.tiny_checkpoint import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, builtin_model):
    logs = tmp_path_factory.mktemp("deploy")
    ports = [free_port() for _ in range(4)]
    worker_port, router_port, worker_metrics_port, router_metrics_port = ports
    worker = Process(["worker", "--model", str(builtin_model), "--port", str(worker_port), "--cache-memory-mb", "64",
                      "-k", "2", "--metrics-port", str(worker_metrics_port)], logs / "worker.log")
    router = None
    try:
        worker.wait_serving(f"127.0.0.1:{worker_port}")
        router = Process(["router", "--host", "127.0.0.1", "--port", str(router_port), "--model", str(builtin_model),
                          "--worker", f"127.0.0.1:{worker_port}", "--metrics-port", str(router_metrics_port)],
                         logs / "router.log")
        router.wait_serving(f"127.0.0.1:{router_port}")
        yield Stack(worker, router, *ports)
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def run_health(server: str, *extra: str) -> subprocess.CompletedProcess:
    """`nextserve health`, the container health check, as a command."""
    return subprocess.run([sys.executable, "-m", "worker.cli", "health", "--server", server, "--timeout", "2", *extra],
                          capture_output=True, text=True, timeout=30)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def wait_idle(address: str, timeout: float = 10.0) -> generation_pb2.GetModelInfoResponse:
    """GetModelInfo once nothing runs and every block and slot is free (or the last answer, on timeout)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        while True:
            info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=5)
            load = info.load
            idle = (load.running_requests == load.waiting_requests == info.router_in_flight == 0
                    and load.free_kv_blocks == load.total_kv_blocks
                    and load.free_gdn_slot_groups == load.total_gdn_slot_groups)
            if idle or time.monotonic() > deadline:
                return info
            time.sleep(0.1)
