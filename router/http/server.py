"""The HTTP server: aiohttp on the router's own event loop, in front of the shared request path.

One middleware holds what every endpoint shares, as the gRPC interceptors do: the request id
(`X-Request-Id`, or a fresh one, echoed back and on every log line), the API key (everything but
/health), the mapping of router errors to OpenAI-style JSON errors (nothing a client sends escapes
as a traceback), and one metrics record per request with gRPC-style status names. aiohttp cancels
a handler when its client disconnects (`handler_cancellation`), which aborts the request on the
worker through the request path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from pathlib import Path

from aiohttp import web

from router.api_key import ApiKey
from router.config import RouterConfig
from router.errors import InvalidArgument, RouterError
from router.http import info
from router.http.chat import chat_completions
from router.http.completions import completions
from router.http.errors import body, internal_reply, reply_for
from router.http.state import attach_state, state_of
from router.metrics import RouterMetrics
from router.request_log import current_request_id
from router.request_path import RequestPath

logger = logging.getLogger("nextserve.router.http")

OPEN_PATHS = ("/health",)  # no API key: orchestrators probe it
_HTTP_ERRORS = {404: ("not_found", "NOT_FOUND"), 405: ("method_not_allowed", "UNIMPLEMENTED"),
                413: ("request_too_large", "RESOURCE_EXHAUSTED")}


class HttpApi:
    def __init__(self, config: RouterConfig, path: RequestPath, metrics: RouterMetrics):
        self.config = config
        self.path = path
        self.metrics = metrics
        self.model_name = config.model_name
        self.served_names = (config.model_name, config.model, str(Path(config.model).resolve()))
        self.started = int(time.time())
        self.num_ready = 0  # follows the pool's readiness listener, so a drain turns /health to 503
        self._api_key = ApiKey(config.api_key) if config.api_key else None
        self.app = web.Application(client_max_size=config.max_request_bytes, middlewares=[self._middleware])
        routes = [
            ("POST", "/v1/completions", completions),
            ("POST", "/v1/chat/completions", chat_completions),
            ("GET", "/v1/models", info.list_models),
            ("GET", "/v1/models/{model}", info.get_model),
            ("GET", "/health", info.health),
            ("POST", "/tokenize", info.tokenize),
            ("POST", "/detokenize", info.detokenize),
            ("GET", "/tokenizer_info", info.tokenizer_info),
        ]
        for method, route, handler in routes:
            self.app.router.add_route(method, route, functools.partial(handler, self))
        self._runner: web.AppRunner | None = None

    async def on_readiness(self, num_ready: int) -> None:
        """A WorkerPool readiness listener."""
        self.num_ready = num_ready

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.config.drain_s)
        await self._runner.setup()
        ssl_context = None
        if self.config.tls_cert:  # the same certificate as the gRPC port
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(self._runner, host, port, reuse_port=False, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(f"could not serve HTTP on {host}:{port} ({e.strerror or e}); pick another --http-port") \
                from None
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening; in-flight requests get drain_s seconds, then they are cancelled (and aborted)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        method = resource.canonical if resource is not None else "unmatched"
        state = attach_state(request)
        state.started = started
        status_name = "INTERNAL"
        try:
            state.client_request_id = request.headers.get("X-Request-Id", "")
            state.request_id = self._start_request(state.client_request_id)
            if self._api_key is not None and request.path not in OPEN_PATHS:
                self._api_key.check((key.lower(), value) for key, value in request.headers.items())
            response = await handler(request)
            status_name = state.status_name or "OK"
            return response
        except RouterError as e:
            reply = reply_for(e)
            status_name = reply.status_name
            level = logging.WARNING if reply.status >= 500 else logging.INFO
            logger.log(level, "request %s: %s %s -> %d: %s", current_request_id.get(), request.method, request.path,
                       reply.status, e.message)
            return self._error_response(request, reply.status, reply.body)
        except web.HTTPException as e:
            code, status_name = _HTTP_ERRORS.get(e.status, ("http_error", "INTERNAL"))
            return self._error_response(request, e.status, body(e.reason, "invalid_request_error", code))
        except (asyncio.CancelledError, ConnectionResetError):
            status_name = "CANCELLED"  # the client went away
            raise
        except Exception:
            logger.exception("request %s: %s %s failed with an unexpected error", current_request_id.get(),
                             request.method, request.path)
            reply = internal_reply(current_request_id.get())
            return self._error_response(request, reply.status, reply.body)
        finally:
            self.metrics.record(method, status_name, started, state.timers)

    @staticmethod
    def _start_request(client_request_id: str) -> str:
        try:
            return RequestPath.start_request(client_request_id)
        except InvalidArgument as e:
            raise InvalidArgument("X-Request-Id", e.message[len(e.field) + 2:]) from None

    @staticmethod
    def _error_response(request: web.Request, status: int, payload: dict) -> web.StreamResponse:
        state = state_of(request)
        if state.stream_opened:
            raise ConnectionResetError("the event stream already started")  # aiohttp closes the connection
        headers = {"X-Request-Id": state.request_id} if state.request_id else None
        return web.json_response(payload, status=status, headers=headers)
