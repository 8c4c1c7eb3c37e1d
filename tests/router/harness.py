"""Runs the real router in-process against fake workers, over real sockets, for one test's event loop."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from router.app import build_router
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.request_path import RequestPath
from router.workers import WorkerPool

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningRouter:
    config: RouterConfig
    server: grpc.aio.Server
    pool: WorkerPool
    port: int
    channel: grpc.aio.Channel
    path: RequestPath
    metrics: RouterMetrics
    http_port: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel)

    async def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

    async def generate(self, metadata=None, timeout=10, **fields) -> list[generation_pb2.GenerateResponse]:
        call = self.stub.Generate(generation_pb2.GenerateRequest(**fields), metadata=metadata, timeout=timeout)
        return [response async for response in call]

    async def model_info(self) -> generation_pb2.GetModelInfoResponse:
        return await self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=5)


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll `predicate` (sync or async) until true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def health_is(router: RunningRouter, status: int, service: str = ""):
    """A wait_until predicate: the router's health for `service` is `status`."""
    async def check():
        return await router.health(service) == status
    return check


@asynccontextmanager
async def running_router(model_dir, addresses: list[str], wait_ready: bool = True, **overrides):
    config = RouterConfig(model=str(model_dir), workers=addresses, host="127.0.0.1", port=0,
                          reconnect_min_s=0.05, reconnect_max_s=0.3, **overrides)
    router = build_router(config)
    await router.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    try:
        if wait_ready:
            await wait_until(lambda: router.pool.num_ready == len(addresses), what="workers ready")
        yield RunningRouter(config, router.grpc_server, router.pool, router.port, channel, router.path,
                            router.metrics, router.http_port)
    finally:
        await channel.close()
        await router.grpc_server.stop(grace=None)
        if router.http is not None:
            await router.http.stop()
        await router.pool.close()
