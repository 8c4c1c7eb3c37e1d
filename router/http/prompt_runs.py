"""The prompts of one HTTP request, run side by side through the request path.

A completions request may carry several prompts (choice i answers prompt i). Each is admitted and
streamed in its own task, so one prompt waiting in the queue never holds up another that already
has a slot; their responses merge into one ordered feed of (choice index, GenerateResponse).
`started` waits until a prompt is admitted (or raises why none could be), so a handler can still
answer 429 / 503 with a status before it opens a 200 stream. Leaving the `async with` (the end, an
error, a client that went away) cancels every task, which aborts its request on the worker.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from nextserve.v1 import generation_pb2
from router.metrics import RouterMetrics, StreamTimer
from router.request_path import PreparedRequest, RequestPath

_ADMITTED = object()
_DONE = object()


class PromptRuns:
    def __init__(self, path: RequestPath, prepared: list[PreparedRequest], metrics: RouterMetrics,
                 timers: list[StreamTimer], started: float):
        self._path = path
        self._prepared = prepared
        self._metrics = metrics
        self._timers = timers  # the HTTP request's, recorded when it ends
        self._started = started  # when the HTTP request came in
        self._feed: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffered: list = []
        self._num_done = 0

    async def __aenter__(self) -> "PromptRuns":
        self._tasks = [asyncio.create_task(self._run(index, prepared), name=f"prompt {index}")
                       for index, prepared in enumerate(self._prepared)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, index: int, prepared: PreparedRequest) -> None:
        timer = self._metrics.timer(self._started)
        self._timers.append(timer)
        try:
            async with self._path.run(prepared) as stream:
                self._feed.put_nowait((index, _ADMITTED))
                async for response in stream:
                    timer.on_response(response)
                    self._feed.put_nowait((index, response))
        except Exception as e:  # handed to the consumer, which decides what the client sees
            self._feed.put_nowait((index, e))
            return
        self._feed.put_nowait((index, _DONE))

    async def started(self) -> None:
        """Returns once some prompt is admitted; raises the error of one that failed before that."""
        while True:
            item = await self._feed.get()
            self._buffered.append(item)
            if item[1] is _ADMITTED:
                return
            if isinstance(item[1], Exception):
                raise item[1]

    async def responses(self) -> AsyncIterator[tuple[int, generation_pb2.GenerateResponse]]:
        """(choice index, response) as they come, until every prompt has finished; raises the first error."""
        while self._num_done < len(self._tasks):
            index, item = self._buffered.pop(0) if self._buffered else await self._feed.get()
            if item is _ADMITTED:
                continue
            if item is _DONE:
                self._num_done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
