"""Processes for the end-to-end tests: real `nextserve` workers and routers on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from worker.client import check_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A `nextserve` command in its own process group, with its output kept in a log file."""

    def __init__(self, args: list[str], log_path, env: dict | None = None):
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        """Until `text` is in the output: a line printed after the health check that a test waited on turns
        SERVING comes a poll later."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in the output after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def wait_serving(self, address: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if check_health(address, timeout=1.0):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{address} not SERVING after {timeout} s:\n{self.output()[-3000:]}")

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_dir():
    from worker.tools.tiny_checkpoint import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def spawn(tmp_path):
    """-> start(args, name) for nextserve commands; everything is stopped after the test."""
    started = []

    def start(args: list[str], name: str, env: dict | None = None) -> Process:
        process = Process(args, tmp_path / f"{name}-{len(started)}.log", env)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


def start_worker(spawn, model_dir, port: int, *extra: str) -> Process:
    worker = spawn(["worker", "--model", str(model_dir), "--port", str(port), "--cache-memory-mb", "64", *extra],
                   "worker")
    worker.wait_serving(f"127.0.0.1:{port}")
    return worker


def start_router(spawn, model_dir, port: int, worker_ports: list[int], *extra: str) -> Process:
    workers = [arg for p in worker_ports for arg in ("--worker", f"127.0.0.1:{p}")]
    router = spawn(["router", "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir), *workers, *extra],
                   "router")
    router.wait_serving(f"127.0.0.1:{port}")
    return router


@pytest.fixture
def channel_to():
    channels = []

    def open_channel(port: int) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_dir):
    """`nextserve serve` with the HTTP API on the random tiny model, prefill chunks of 64 tokens, shared by
    the HTTP API tests. -> (http port, grpc port)."""
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("openai") / "serve.log"
    server = Process(["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(grpc_port),
                      "--http-port", str(http_port),
                      "--cache-memory-mb", "64", "--max-num-batched-tokens", "64"], log)
    try:
        server.wait_serving(f"127.0.0.1:{grpc_port}")
        yield http_port, grpc_port
    finally:
        server.stop()
