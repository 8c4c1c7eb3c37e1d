"""`nextserve router` / `python -m router`: the public gRPC server in front of the worker groups.

Flags and their `NEXTSERVE_ROUTER_*` environment variables are read once, in `main`. `serve` runs
until SIGTERM or SIGINT, then drains: it stops accepting RPCs and gives in-flight streams
`drain_s` seconds to finish before cancelling them (which aborts them on the workers).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import MISSING
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nextserve.v1 import generation_pb2_grpc
from router.admission import Admission
from router.config import RouterConfig
from router.health import GENERATION_SERVICE, readiness_publisher
from router.interceptors import ApiKeyInterceptor, ErrorInterceptor
from router.metrics import RouterMetrics
from router.request_log import configure_logging
from router.server import GenerationServicer
from router.tokenizer import RouterTokenizer
from router.worker_connection import Timing
from router.workers import WorkerPool

logger = logging.getLogger("nextserve.router")

# flag -> (RouterConfig field, type); each flag's environment variable is NEXTSERVE_ROUTER_<FIELD>.
_FLAGS = {
    "--host": ("host", str, "address to listen on"),
    "--port": ("port", int, "port to listen on; 0 picks a free one (logged)"),
    "--metrics-port": ("metrics_port", int, "serve Prometheus /metrics over HTTP on this port of --host "
                                            "(0: pick a free one; unset: no metrics)"),
    "--model": ("model", str, "the model folder (tokenizer.json, tokenizer_config.json), same as the workers'"),
    "--max-in-flight": ("max_in_flight", int, "requests streaming at once"),
    "--max-queue": ("max_queue", int, "requests waiting for a slot; beyond that RESOURCE_EXHAUSTED"),
    "--max-prompt-tokens": ("max_prompt_tokens", int, "refuse longer prompts (default: the model's limit)"),
    "--max-stop-strings": ("max_stop_strings", int, "stop strings per request"),
    "--max-stop-string-bytes": ("max_stop_string_bytes", int, "bytes per stop string"),
    "--max-request-bytes": ("max_request_bytes", int, "largest request message accepted"),
    "--api-key": ("api_key", str, "require 'authorization: Bearer KEY' or 'x-api-key: KEY' on Generation "
                                  "(prefer the environment variable: flags show in `ps`)"),
    "--tls-cert": ("tls_cert", str, "PEM certificate chain (with --tls-key: serve TLS)"),
    "--tls-key": ("tls_key", str, "PEM private key"),
    "--reconnect-min-s": ("reconnect_min_s", float, "first wait before reconnecting to a failed worker"),
    "--reconnect-max-s": ("reconnect_max_s", float, "longest wait between reconnection attempts"),
    "--worker-timeout-s": ("worker_timeout_s", float, "bound on GetInfo calls to workers"),
    "--drain-s": ("drain_s", float, "on SIGTERM, how long in-flight streams may take to finish"),
    "--log-level": ("log_level", str, "DEBUG, INFO, WARNING or ERROR"),
}
WORKERS_ENV = "NEXTSERVE_ROUTER_WORKERS"  # comma-separated host:port list


def env_name(field: str) -> str:
    return f"NEXTSERVE_ROUTER_{field.upper()}"


def build_parser() -> argparse.ArgumentParser:
    """Each flag defaults to its environment variable, read when this is called (never at import);
    a value from neither leaves the RouterConfig default."""
    parser = argparse.ArgumentParser(prog="nextserve router", description=__doc__.splitlines()[0])
    fields = RouterConfig.__dataclass_fields__
    for flag, (field, kind, help_) in _FLAGS.items():
        default = fields[field].default
        shown = "" if field == "api_key" or default is MISSING or default is None else f", default {default}"
        # argparse converts a string default with `type`, so environment values are checked like flags.
        parser.add_argument(flag, dest=field, type=kind, default=os.environ.get(env_name(field)),
                            help=f"{help_} (env {env_name(field)}{shown})")
    parser.add_argument("--worker", dest="workers", action="append", default=None,
                        help=f"a worker group's rank-0 address host:port; repeat for several "
                             f"(env {WORKERS_ENV}, comma-separated)")
    return parser


def config_from_args(argv: list[str] | None = None) -> RouterConfig:
    """Flags, then environment, then defaults; a bad value exits with a message naming it."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    workers = args.pop("workers") or [w.strip() for w in os.environ.get(WORKERS_ENV, "").split(",") if w.strip()]
    given = {field: value for field, value in args.items() if value is not None}
    given.setdefault("model", "")  # RouterConfig explains what is missing
    try:
        return RouterConfig(workers=workers, **given)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def build_server(config: RouterConfig, metrics: RouterMetrics | None = None) -> tuple[grpc.aio.Server, WorkerPool]:
    """The router's gRPC server (services, health, reflection, interceptors; no port bound yet) and
    its worker pool (not started). Call from inside the event loop that will run them. `metrics`
    (default: a fresh RouterMetrics) counts the RPCs; serving it over HTTP is the caller's choice."""
    metrics = metrics or RouterMetrics()
    tokenizer = RouterTokenizer(config.model)
    timing = Timing(config.reconnect_min_s, config.reconnect_max_s, config.worker_timeout_s)
    pool = WorkerPool(config.workers, tokenizer.vocab_size, timing)
    # The metrics interceptor is the outermost, so it sees the statuses the error interceptor chose.
    interceptors = [metrics.interceptor(), ErrorInterceptor()]
    if config.api_key:
        interceptors.append(ApiKeyInterceptor(config.api_key, (GENERATION_SERVICE,)))
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.so_reuseport", 0),  # two routers must not silently share a port
    ])
    admission = Admission(config.max_in_flight, config.max_queue)
    metrics.track(admission, pool)
    servicer = GenerationServicer(config, tokenizer, pool, admission)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pool.add_readiness_listener(readiness_publisher(health_servicer))
    reflection.enable_server_reflection((GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, pool


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


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGTERM / SIGINT, then drain and return."""
    metrics = RouterMetrics()
    server, pool = build_server(config, metrics)
    port = bind(server, config)
    metrics_port = None if config.metrics_port is None else metrics.serve(config.host, config.metrics_port)
    await pool.start()
    await server.start()
    logger.info("router listening on %s:%d, workers=%s, model=%s max_in_flight=%d max_queue=%d tls=%s api_key=%s "
                "metrics_port=%s", config.host, port, config.workers, config.model, config.max_in_flight,
                config.max_queue, "on" if config.tls_cert else "off", "on" if config.api_key else "off",
                "off" if metrics_port is None else metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router draining: no new requests; in-flight streams get %.1f s", config.drain_s)
    await pool.stop_advertising()
    await server.stop(grace=config.drain_s)
    await pool.close()
    metrics.close()
    logger.info("router stopped")


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level)
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; this keeps odd platforms working
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(config))
    except (OSError, ValueError) as e:  # e.g. the port is taken, tokenizer.json is unreadable
        logger.error("router cannot start: %s", e)
        raise SystemExit(1) from None
