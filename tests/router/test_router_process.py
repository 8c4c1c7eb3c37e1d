"""The router and fake workers as real processes: no torch in the router, SIGTERM drain, kill -9 recovery."""

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.router.harness import NOT_SERVING, SERVING, health_is, running_router, wait_until

REPO = Path(__file__).resolve().parents[2]

# Runs the router's real entry point, then reports which heavy modules it ever imported.
ROUTER_PROBE = """
import sys
from router.main import main
try:
    main(sys.argv[1:])
finally:
    heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers', 'worker'))
    print('HEAVY_MODULES', heavy, flush=True)
"""


def _spawn(args, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 20) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)}")


def _start_fake_worker(port: int = 0, step_interval_s: float = 0.02) -> tuple[subprocess.Popen, int]:
    process = _spawn(["-m", "tests.router.fake_worker", "--port", str(port), "--step-interval-s", str(step_interval_s)])
    return process, int(_wait_for_line(process, r"fake worker listening on (\d+)").group(1))


def test_router_process_has_no_torch_and_drains_on_sigterm(model_dir):
    worker, worker_port = _start_fake_worker(step_interval_s=0.05)
    router = _spawn(["-c", ROUTER_PROBE, "--port", "0", "--http-port", "0", "--host", "127.0.0.1", "--drain-s", "5"],
                    env_extra={"NEXTSERVE_ROUTER_MODEL": str(model_dir),
                               "NEXTSERVE_ROUTER_WORKERS": f"127.0.0.1:{worker_port}"})
    try:
        match = _wait_for_line(router, r"router listening on 127\.0\.0\.1:(\d+), workers=\[(.*)\].* http_port=(\d+)")
        assert match.group(2) == f"'127.0.0.1:{worker_port}'"
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(3)), timeout=20)
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest()).status != SERVING:
            assert time.monotonic() < deadline, "router never became SERVING"
            time.sleep(0.05)
        stub = generation_pb2_grpc.GenerationStub(channel)
        chat = stub.Generate(generation_pb2.GenerateRequest(
            messages=[generation_pb2.ChatMessage(role="user", content="hi 世界")], max_tokens=2), timeout=10)
        assert list(chat)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        connection.request("POST", "/v1/completions", json.dumps({"prompt": "drain me too", "max_tokens": 30, "stream": True}),
                     {"Content-Type": "application/json"})
        sse = connection.getresponse()
        assert sse.status == 200 and sse.readline().startswith(b"data: {")
        stream = stub.Generate(generation_pb2.GenerateRequest(text="drain me", max_tokens=30), timeout=20)
        first = next(stream)
        router.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight streams finish during the drain
        events = [line for line in sse.read().split(b"\n") if line]
        assert events[-1] == b"data: [DONE]" and len(events) == 30  # 29 more tokens, the finish among them
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 30
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(generation_pb2.GenerateRequest(text="late", max_tokens=2), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        output, _ = router.communicate(timeout=10)
        assert router.returncode == 0, output
        assert "HEAVY_MODULES []" in output, output
        channel.close()
    finally:
        for process in (router, worker):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_killed_worker_fails_streams_and_recovers_on_restart(model_dir):
    async def scenario():
        worker, port = _start_fake_worker()
        try:
            async with running_router(model_dir, [f"127.0.0.1:{port}"]) as router:
                call = router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=200))
                await call.read()
                worker.send_signal(signal.SIGKILL)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                failed_after = time.monotonic() - started
                await wait_until(health_is(router, NOT_SERVING), what="health NOT_SERVING")
                unready_health = await router.health()
                worker.wait()
                worker, _ = _start_fake_worker(port)
                await wait_until(lambda: router.pool.num_ready == 1, timeout=10, what="worker ready again")
                await wait_until(health_is(router, SERVING), what="health SERVING again")
                recovered_health = await router.health()
                responses = await router.generate(text="x", max_tokens=3)
        finally:
            worker.kill()
            worker.wait()
        return error.value, failed_after, unready_health, recovered_health, responses

    error, failed_after, unready_health, recovered_health, responses = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert failed_after < 5.0
    assert unready_health == NOT_SERVING and recovered_health == SERVING
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH

