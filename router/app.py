"""The router's parts wired together: one request path, its two adapters (gRPC, HTTP), the worker pool.

`build_router` makes everything (call it inside the event loop that will run it); `start` binds the
ports and starts serving; `drain` stops advertising readiness and lets in-flight requests finish
within `drain_s` on both APIs; `close` stops the worker connections.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nextserve.v1 import generation_pb2_grpc
from router.admission import Admission
from router.config import RouterConfig
from router.health import GENERATION_SERVICE, readiness_publisher
from router.http.server import HttpApi
from router.interceptors import ApiKeyInterceptor, ErrorInterceptor
from router.metrics import RouterMetrics
from router.request_path import RequestPath
from router.server import GenerationServicer
from router.tokenizer import RouterTokenizer
from router.worker_connection import Timing
from router.workers import WorkerPool


@dataclass
class Router:
    config: RouterConfig
    metrics: RouterMetrics
    path: RequestPath
    pool: WorkerPool
    grpc_server: grpc.aio.Server
    http: HttpApi | None
    port: int = 0  # the bound gRPC port (the chosen one for 0)
    http_port: int | None = None

    async def start(self) -> None:
        self.port = bind(self.grpc_server, self.config)
        if self.http is not None:
            self.http_port = await self.http.start(self.config.host, self.config.http_port)
        await self.pool.start()
        await self.grpc_server.start()

    async def drain(self) -> None:
        """Health goes NOT_SERVING / 503; both APIs refuse new requests and finish the running ones."""
        await self.pool.stop_advertising()
        stops = [self.grpc_server.stop(grace=self.config.drain_s)]
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)

    async def close(self) -> None:
        await self.pool.close()


def build_router(config: RouterConfig, metrics: RouterMetrics | None = None) -> Router:
    """Everything, nothing bound or started yet. `metrics` (default: a fresh RouterMetrics) counts
    the requests of both APIs; serving it over HTTP is the caller's choice."""
    metrics = metrics or RouterMetrics()
    tokenizer = RouterTokenizer(config.model)
    timing = Timing(config.reconnect_min_s, config.reconnect_max_s, config.worker_timeout_s)
    pool = WorkerPool(config.workers, tokenizer.vocab_size, timing)
    admission = Admission(config.max_in_flight, config.max_queue)
    metrics.track(admission, pool)
    path = RequestPath(config, tokenizer, pool, admission)
    http = None
    if config.http_port is not None:
        http = HttpApi(config, path, metrics)
        pool.add_readiness_listener(http.on_readiness)
    return Router(config, metrics, path, pool, _grpc_server(config, metrics, path, pool), http)


def _grpc_server(config: RouterConfig, metrics: RouterMetrics, path: RequestPath, pool: WorkerPool) -> grpc.aio.Server:
    # The metrics interceptor is the outermost, so it sees the statuses the error interceptor chose.
    interceptors = [metrics.interceptor(), ErrorInterceptor()]
    if config.api_key:
        interceptors.append(ApiKeyInterceptor(config.api_key, (GENERATION_SERVICE,)))
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.so_reuseport", 0),  # two routers must not silently share a port
    ])
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(path), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pool.add_readiness_listener(readiness_publisher(health_servicer))
    reflection.enable_server_reflection((GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


def bind(server: grpc.aio.Server, config: RouterConfig) -> int:
    """Bind the configured address (TLS if a cert is given); returns the port (the chosen one for 0)."""
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                        Path(config.tls_cert).read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"could not listen on {address}: the port is in use, or the host is not an address of "
                      f"this machine (--host / --port)")
    return port
