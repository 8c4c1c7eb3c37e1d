"""The worker groups this router sends requests to: which are ready, which is least loaded.

Each `WorkerConnection` owns its own state in its own task; the pool only reads their published
fields (`ready`, `info`, `load`, `num_in_flight`) and tells listeners when readiness changes, so
health can follow it.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Awaitable, Callable

from nextserve.v1 import common_pb2, engine_pb2
from router.errors import Unavailable
from router.worker_connection import RequestHandle, Timing, WorkerConnection

NO_WORKER_READY = "no worker group is ready"


class WorkerPool:
    def __init__(self, addresses: list[str], tokenizer_vocab_size: int, timing: Timing = Timing()):
        self.workers = [WorkerConnection(address, tokenizer_vocab_size, timing, self._readiness_changed)
                        for address in addresses]
        self._changed = asyncio.Event()
        self._tiebreak = itertools.count()
        self._listeners: list[Callable[[int], Awaitable[None]]] = []
        self._publisher: asyncio.Task | None = None

    def add_readiness_listener(self, listener: Callable[[int], Awaitable[None]]) -> None:
        """`await listener(num_ready)` at start and whenever a worker becomes ready or unready."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Start every connection; returns once listeners know the initial state (none ready)."""
        for listener in self._listeners:
            await listener(0)
        for worker in self.workers:
            worker.start()
        self._publisher = asyncio.create_task(self._publish_readiness(0), name="worker readiness")

    async def stop_advertising(self) -> None:
        """Tell listeners nothing is ready from now on (health goes NOT_SERVING for a drain), while the
        connections keep serving the requests already in flight."""
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
        for listener in self._listeners:
            await listener(0)

    async def close(self) -> None:
        await self.stop_advertising()
        await asyncio.gather(*(worker.close() for worker in self.workers))

    @property
    def ready_workers(self) -> list[WorkerConnection]:
        return [worker for worker in self.workers if worker.ready]

    @property
    def num_ready(self) -> int:
        return len(self.ready_workers)

    def _readiness_changed(self) -> None:
        self._changed.set()

    async def _publish_readiness(self, published: int) -> None:
        while True:
            num_ready = self.num_ready
            if num_ready != published:
                for listener in self._listeners:
                    await listener(num_ready)
                published = num_ready
            await self._changed.wait()
            self._changed.clear()

    def request_limits(self) -> tuple[int, int]:
        """(vocab_size, max_model_len) that every ready worker accepts; Unavailable if none is ready."""
        infos = [worker.info for worker in self.ready_workers]
        if not infos:
            raise Unavailable(NO_WORKER_READY)
        return min(info.vocab_size for info in infos), min(info.max_model_len for info in infos)

    def pick(self) -> WorkerConnection:
        """The ready worker with the fewest of our requests, then the shortest reported queue; ties rotate."""
        ready = self.ready_workers
        if not ready:
            raise Unavailable(NO_WORKER_READY)
        offset = next(self._tiebreak)

        def load(indexed):
            index, worker = indexed
            reported = worker.load.running_requests + worker.load.waiting_requests if worker.load else 0
            return worker.num_in_flight, reported, (index - offset) % len(ready)

        return min(enumerate(ready), key=load)[1]

    def submit(self, engine_request_id: str, prompt_token_ids: list[int],
               sampling: engine_pb2.SamplingConfig) -> RequestHandle:
        return self.pick().submit(engine_request_id, prompt_token_ids, sampling)

    async def fresh_infos(self) -> list[engine_pb2.EngineInfo]:
        """GetInfo from every ready worker now (not the load of their last step, which can be stale)."""
        infos = await asyncio.gather(*(worker.fetch_info() for worker in self.ready_workers))
        return [info for info in infos if info is not None]


def summed_load(infos: list[engine_pb2.EngineInfo]) -> common_pb2.EngineLoad:
    total = common_pb2.EngineLoad()
    for info in infos:
        for field in ("running_requests", "waiting_requests", "free_kv_blocks", "total_kv_blocks",
                      "free_gdn_slot_groups", "total_gdn_slot_groups", "num_preemptions"):
            setattr(total, field, getattr(total, field) + getattr(info.load, field))
    return total
