"""Admission: a bounded number of requests in flight, a bounded queue behind them, refusal beyond.

Refusing at once (RESOURCE_EXHAUSTED) when the queue is full keeps latency bounded and tells load
balancers and clients to back off, instead of letting waits grow without limit. Client request ids
are registered here too, so two live requests never share one (logs and aborts key on it).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from router.errors import InvalidArgument, ResourceExhausted


class Admission:
    """Used from the servicers on the event loop; every check-and-update happens without an await
    in between, so no lock is needed."""

    def __init__(self, max_in_flight: int, max_queue: int):
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_in_flight)
        self.num_in_flight = 0
        self.num_waiting = 0
        self._live_request_ids: set[str] = set()

    @asynccontextmanager
    async def admit(self, client_request_id: str = ""):
        """Hold a slot (waiting in the queue if need be) for the body of the `async with`."""
        if client_request_id:
            if client_request_id in self._live_request_ids:
                raise InvalidArgument("request_id", f"{client_request_id!r} is already in flight; "
                                                    "use a unique id per live request")
        if self.num_in_flight >= self.max_in_flight and self.num_waiting >= self.max_queue:
            raise ResourceExhausted(
                f"the router is at capacity ({self.num_in_flight} requests in flight, {self.num_waiting} "
                f"queued; limits {self.max_in_flight} and {self.max_queue}); retry with backoff")
        if client_request_id:
            self._live_request_ids.add(client_request_id)
        try:
            self.num_waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.num_waiting -= 1
            self.num_in_flight += 1
            try:
                yield
            finally:
                self.num_in_flight -= 1
                self._slots.release()
        finally:
            self._live_request_ids.discard(client_request_id)
