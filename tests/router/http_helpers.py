"""Plain HTTP against an in-process router: JSON calls, raw SSE reads, a scenario runner."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.router.fake_worker import FakeEngine, FakeWorker


def run(coroutine, timeout: float = 30):
    async def guarded():
        try:
            return await asyncio.wait_for(coroutine, timeout)
        finally:
            await FakeWorker.stop_all()

    return asyncio.run(guarded())


async def fake(**engine_args) -> FakeWorker:
    return await FakeWorker(FakeEngine(**engine_args)).start()


async def call(url: str, path: str, payload=None, method: str = "POST", headers=None, data: bytes | None = None):
    """-> (status, parsed JSON body or the raw text, response headers)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, json=payload if data is None else None, data=data,
                                   headers=headers) as response:
            text = await response.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return response.status, parsed, response.headers


def parse_events(raw: bytes) -> list:
    """SSE bytes -> the JSON payloads, checking the framing: only `data: ...` events split by blank lines,
    the last being `[DONE]` (returned as the string "[DONE]")."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        body = block[len("data: "):]
        events.append(body if body == "[DONE]" else json.loads(body))
    assert events and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events


async def stream(url: str, path: str, payload: dict, headers=None) -> tuple[int, str, list]:
    """A streamed request read to its end -> (status, content type, events)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=payload, headers=headers) as response:
            raw = await response.read()
            if response.status != 200:
                return response.status, response.headers.get("Content-Type", ""), [json.loads(raw)]
            return response.status, response.headers.get("Content-Type", ""), parse_events(raw)
