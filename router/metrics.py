"""Prometheus metrics of the router, served over HTTP at /metrics (`--metrics-port`), and the access log.

`MetricsInterceptor` sits outside every other interceptor, so it sees each Generation RPC as the
client does: its final status (after the error interceptor has mapped exceptions), the time to its
first token and the gaps between streamed chunks. The HTTP API records its requests through the same
`StreamTimer` and `RouterMetrics.record`, with the same status names. Admission and worker state are
read when Prometheus scrapes. Each `RouterMetrics` has its own registry (never prometheus_client's
global one), so tests can build several routers in one process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.health import GENERATION_SERVICE

access_log = logging.getLogger("nextserve.router.access")

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _RouterState(Collector):
    """Admission and worker readiness, read at scrape time (plain int reads from the HTTP thread)."""

    def __init__(self, admission, pool):
        self.admission = admission
        self.pool = pool

    def collect(self):
        yield GaugeMetricFamily("nextserve_router_requests_in_flight", "Generation requests streaming now",
                                value=self.admission.num_in_flight)
        yield GaugeMetricFamily("nextserve_router_requests_queued", "Generation requests waiting for an in-flight slot",
                                value=self.admission.num_waiting)
        yield GaugeMetricFamily("nextserve_router_workers_ready", "Worker groups connected and ready",
                                value=self.pool.num_ready)
        yield GaugeMetricFamily("nextserve_router_workers", "Worker groups configured", value=len(self.pool.workers))


class RouterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("nextserve_router_requests",
                                "Generation RPCs and HTTP API requests finished, by method (RPC name or HTTP path) "
                                "and status code", ["method", "code"], registry=r)
        self.time_to_first_token = Histogram(
            "nextserve_router_time_to_first_token_seconds",
            "From receiving a generation request (Generate, an HTTP completion) to sending its first token", buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "nextserve_router_inter_token_latency_seconds",
            "Gap between streamed chunks of a generation, per token (a chunk of n tokens counts n times, "
            "each with gap/n)", buckets=ITL_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "nextserve_router_request_duration_seconds", "Generation requests that ended OK: receipt to end of stream",
            buckets=DURATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nextserve_router_prompt_tokens",
                                     "Prompt tokens of generation requests that streamed to their end", registry=r)
        self.generation_tokens = Counter("nextserve_router_generation_tokens",
                                         "Tokens streamed to clients (cancelled requests' tokens too)", registry=r)
        self._server = None

    def track(self, admission, pool) -> None:
        """Export in-flight, queued and worker counts (call once, when the router is built)."""
        self.registry.register(_RouterState(admission, pool))

    def interceptor(self) -> "MetricsInterceptor":
        return MetricsInterceptor(self)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a daemon thread; returns the port (the chosen one for 0)."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); pick another "
                          f"--metrics-port") from None
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def timer(self, started: float | None = None) -> "StreamTimer":
        """A timer for one generation stream, from `started` (a time.perf_counter(); default: now)."""
        return StreamTimer(self, time.perf_counter() if started is None else started)

    def record(self, method: str, code: str, started: float, timers: list["StreamTimer"] = ()) -> None:
        """Count one finished request (its streams' timers, if it generated) and write its access-log line."""
        duration = time.perf_counter() - started
        self.requests.labels(method, code).inc()
        prompt_tokens = [t.prompt_tokens for t in timers if t.prompt_tokens is not None]
        if code == "OK" and timers:
            self.request_duration.observe(duration)
            self.prompt_tokens.inc(sum(prompt_tokens))
        if not timers:
            access_log.debug("%s %s in %.3f s", method, code, duration)
            return
        firsts = [t.first for t in timers if t.first is not None]
        ttft = f"{min(firsts) - started:.3f}s" if firsts else "-"
        prompt = sum(prompt_tokens) if prompt_tokens else "-"
        access_log.info("%s %s in %.3fs: prompt_tokens=%s completion_tokens=%d ttft=%s", method, code, duration,
                        prompt, sum(t.num_tokens for t in timers), ttft)


class StreamTimer:
    """Token timing of one generation stream (a Generate call, one prompt of an HTTP request)."""

    def __init__(self, metrics: RouterMetrics, started: float):
        self.metrics = metrics
        self.started = started
        self.first: float | None = None
        self.last = started
        self.num_tokens = 0
        self.prompt_tokens: int | None = None

    def on_response(self, response) -> None:
        now = time.perf_counter()
        n = len(response.token_ids)
        if n:
            if self.first is None:
                self.first = now
                self.metrics.time_to_first_token.observe(now - self.started)
            else:
                gap = (now - self.last) / n
                for _ in range(n):
                    self.metrics.inter_token_latency.observe(gap)
            self.last = now
            self.num_tokens += n
            self.metrics.generation_tokens.inc(n)
        if response.finish_reason:
            self.prompt_tokens = response.usage.prompt_tokens


# The client's clock starts before ours, so its deadline passes first and it cancels the call a
# moment before our copy of the deadline expires.
DEADLINE_MARGIN_S = 0.05


def _ended_by_client(context) -> grpc.StatusCode:
    """A handler cancelled under us: the client's deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_MARGIN_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _aborted_code(context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts Generation RPCs by final status, times Generate streams, writes one access-log line each."""

    def __init__(self, metrics: RouterMetrics, services: tuple[str, ...] = (GENERATION_SERVICE,)):
        self.metrics = metrics
        self._prefixes = tuple(f"/{service}/" for service in services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        return handler

    def _unary(self, method: str, behavior):
        async def unary(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.INTERNAL
            try:
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = _ended_by_client(context)
                raise
            finally:
                self.metrics.record(method, code.name, started)

        return unary

    def _stream(self, method: str, behavior):
        async def unary_stream(request, context):
            timer = self.metrics.timer()
            code = grpc.StatusCode.INTERNAL
            try:
                async for response in behavior(request, context):
                    timer.on_response(response)
                    yield response
                code = grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: gRPC closed the stream while it waited to send (the client went away).
                code = _ended_by_client(context)
                raise
            finally:
                self.metrics.record(method, code.name, timer.started, [timer])

        return unary_stream
