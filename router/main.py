"""`nextserve router` / `python -m router`: the public gRPC (and optional HTTP) API in front of the worker groups.

Flags and their `NEXTSERVE_ROUTER_*` environment variables are read once, in `main`. `serve` runs
until SIGTERM or SIGINT, then drains: it stops accepting requests on both APIs and gives in-flight
streams `drain_s` seconds to finish before cancelling them (which aborts them on the workers).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import MISSING

from router.app import build_router
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.request_log import configure_logging

logger = logging.getLogger("nextserve.router")

# flag -> (RouterConfig field, type); each flag's environment variable is NEXTSERVE_ROUTER_<FIELD>.
_FLAGS = {
    "--host": ("host", str, "address to listen on"),
    "--port": ("port", int, "port to listen on; 0 picks a free one (logged)"),
    "--http-port": ("http_port", int, "also serve the OpenAI-compatible HTTP API on this port of --host "
                                      "(0: pick a free one, logged; unset: no HTTP API)"),
    "--metrics-port": ("metrics_port", int, "serve Prometheus /metrics over HTTP on this port of --host "
                                            "(0: pick a free one; unset: no metrics)"),
    "--metrics-host": ("metrics_host", str, "address of the --metrics-port (default: --host)"),
    "--model": ("model", str, "the model folder (tokenizer.json, tokenizer_config.json), same as the workers'"),
    "--max-in-flight": ("max_in_flight", int, "requests streaming at once"),
    "--max-queue": ("max_queue", int, "requests waiting for a slot; beyond that RESOURCE_EXHAUSTED (HTTP 429)"),
    "--max-prompt-tokens": ("max_prompt_tokens", int, "refuse longer prompts (default: the model's limit)"),
    "--max-stop-strings": ("max_stop_strings", int, "stop strings per request"),
    "--max-stop-string-bytes": ("max_stop_string_bytes", int, "bytes per stop string"),
    "--max-request-bytes": ("max_request_bytes", int, "largest request message (or HTTP body) accepted"),
    "--api-key": ("api_key", str, "require 'authorization: Bearer KEY' or 'x-api-key: KEY' on Generation and "
                                  "the HTTP API but /health (prefer the environment variable: flags show in `ps`)"),
    "--tls-cert": ("tls_cert", str, "PEM certificate chain (with --tls-key: serve TLS, on the HTTP port too)"),
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


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGTERM / SIGINT, then drain and return."""
    metrics = RouterMetrics()
    router = build_router(config, metrics)
    metrics_host = config.metrics_host or config.host
    metrics_port = None if config.metrics_port is None else metrics.serve(metrics_host, config.metrics_port)
    await router.start()
    logger.info("router listening on %s:%d, workers=%s, model=%s max_in_flight=%d max_queue=%d tls=%s api_key=%s "
                "http_port=%s metrics_port=%s", config.host, router.port, config.workers, config.model,
                config.max_in_flight, config.max_queue, "on" if config.tls_cert else "off",
                "on" if config.api_key else "off", "off" if router.http_port is None else router.http_port,
                "off" if metrics_port is None else metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router draining: no new requests; in-flight streams get %.1f s", config.drain_s)
    await router.drain()
    await router.close()
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
