"""Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]\n\n`."""

from __future__ import annotations

import json

from aiohttp import web

from router.http.state import state_of

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStream:
    """One response's event stream; `open` sends the 200 headers, so call it only once the request is admitted."""

    def __init__(self, response: web.StreamResponse):
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict | None = None) -> "EventStream":
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies such as nginx must not hold chunks back
            **(headers or {}),
        })
        await response.prepare(request)
        state_of(request).stream_opened = True
        return cls(response)

    async def send(self, payload: dict) -> None:
        """Raises ConnectionResetError once the client has gone."""
        await self.response.write(encode_event(payload))

    async def close(self) -> None:
        await self.response.write(DONE)
        await self.response.write_eof()
