"""Runs the engine on its own thread so that gRPC I/O never waits for a model step.

Connections hand requests and aborts to the loop through a thread-safe inbox; after each step the
loop sends every connection one message with the new tokens of its requests.
"""

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from worker.engine.llm_engine import LLMEngine, RequestOutput
from worker.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Connection:
    """One router's stream. `deliver(step_id, outputs, stats)` and `fail(request_id, message, internal)`
    are called on the engine thread and must hand off to the connection's own event loop."""

    id: int
    deliver: Callable[[int, list[tuple[str, RequestOutput]], dict], None]
    fail: Callable[[str, str, bool], None]
    request_ids: set[str] = field(default_factory=set)

    def engine_id(self, request_id: str) -> str:
        return f"{self.id}/{request_id}"


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: Callable[[float], None] | None = None):
        """`on_step(seconds)` is called on the engine thread after every step (metrics)."""
        self.engine = engine
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._owners: dict[str, tuple[Connection, str]] = {}  # engine request id -> (connection, its id)
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def add(self, conn: Connection, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._post(("add", conn, request_id, prompt_token_ids, params))

    def abort(self, conn: Connection, request_id: str) -> None:
        self._post(("abort", conn, request_id))

    def drop(self, conn: Connection) -> None:
        """The router went away: abort everything it had in flight."""
        self._post(("drop", conn))

    def _post(self, item) -> None:
        self._inbox.put(item)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            started = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception:
                if self.engine.ranks is not None:
                    # A failed collective means a rank is gone: the group cannot go on without it.
                    logger.critical("engine step failed in a tensor-parallel group; exiting", exc_info=True)
                    logging.shutdown()
                    os._exit(1)
                logger.exception("engine step failed; aborting every request in flight")
                self._fail_everything("engine step failed; see the worker log")
                continue
            if self._on_step is not None:
                self._on_step(time.perf_counter() - started)
            self._steps += 1
            self._publish(outputs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, conn, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(conn, *args)
            elif kind == "abort":
                self.engine.abort(conn.engine_id(args[0]))
            elif kind == "drop":
                for request_id in list(conn.request_ids):
                    self.engine.abort(conn.engine_id(request_id))

    def _add(self, conn: Connection, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        engine_id = conn.engine_id(request_id)
        log = {"request_id": engine_id}
        if engine_id in self._owners:
            logger.warning("refused: already in flight on this connection", extra=log)
            conn.fail(request_id, f"request_id {request_id!r} is already in flight on this connection", False)
            return
        try:
            self.engine.add_request(engine_id, prompt_token_ids, params)
        except ValueError as e:
            logger.info("refused: %s", e, extra=log)
            conn.fail(request_id, str(e), False)
            return
        logger.debug("added: %d prompt tokens, max_tokens %d", len(prompt_token_ids), params.max_tokens, extra=log)
        self._owners[engine_id] = (conn, request_id)
        conn.request_ids.add(request_id)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        by_connection: dict[Connection, list[tuple[str, RequestOutput]]] = {}
        for out in outputs:
            owner = self._owners.get(out.request_id)
            if owner is None:
                continue
            conn, request_id = owner
            by_connection.setdefault(conn, []).append((request_id, out))
            if out.finished:
                logger.debug("finished (%s): %d prompt + %d generated tokens, %d preemptions", out.finish_reason,
                             len(out.prompt_token_ids), len(out.token_ids), out.num_preemptions,
                             extra={"request_id": out.request_id})
                del self._owners[out.request_id]
                conn.request_ids.discard(request_id)
        stats = self.engine.stats()
        for conn, items in by_connection.items():
            conn.deliver(self._steps, items, stats)

    def _fail_everything(self, message: str) -> None:
        for engine_id, (conn, request_id) in list(self._owners.items()):
            self.engine.abort(engine_id)
            conn.fail(request_id, message, True)
            conn.request_ids.discard(request_id)
        self._owners.clear()
        try:
            self.engine.step()  # applies the aborts, which frees every block and slot
        except Exception:
            logger.exception("engine could not release the failed requests")
