"""What the middleware and the handlers of one HTTP request share, stored on the request."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from router.metrics import StreamTimer


@dataclass
class RequestState:
    started: float = 0.0  # time.perf_counter() when the request came in (time to first token counts from it)
    client_request_id: str = ""  # the X-Request-Id header, or ""
    request_id: str = ""  # that, or a fresh one
    timers: list[StreamTimer] = field(default_factory=list)  # one per generation stream, for the metrics
    status_name: str | None = None  # set by a handler whose 200 stream ended in an error
    stream_opened: bool = False  # an SSE response is under way: errors can no longer be a status


# aiohttp >= 3.14 wants typed keys on requests; earlier versions take the plain string.
_KEY = web.RequestKey("nextserve_state", RequestState) if hasattr(web, "RequestKey") else "nextserve_state"


def state_of(request: web.Request) -> RequestState:
    return request[_KEY]


def attach_state(request: web.Request) -> RequestState:
    state = request[_KEY] = RequestState()
    return state
