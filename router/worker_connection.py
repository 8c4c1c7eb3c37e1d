"""One connection to one worker group (its rank 0), owned by one asyncio task.

The task connects, checks the worker with GetInfo, opens the Connect stream and then multiplexes
two inputs: commands from the servicers (add / abort, through `_inbox`) and step outputs from the
worker (routed to each request's own queue). Only that task touches the routing table and the
stream, so nothing is shared under locks. When the stream breaks, every request it carried gets
UNAVAILABLE at once (gRPC reports a dropped TCP connection immediately), and the task reconnects
with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import grpc

from nextserve.v1 import engine_pb2, engine_pb2_grpc
from router.errors import RouterError, Unavailable, WorkerRefused

logger = logging.getLogger("nextserve.router.workers")

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # One channel per session: its own reconnect backoff must not outlast ours.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Timing:
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 3.0
    rpc_timeout_s: float = 5.0


class RequestHandle:
    """A servicer's view of one request on one worker: its deltas, in order, then the end."""

    def __init__(self, worker: "WorkerConnection", engine_request_id: str):
        self.worker = worker
        self.engine_request_id = engine_request_id
        self.events: asyncio.Queue = asyncio.Queue()  # RequestDelta | RouterError
        self.finished = False

    async def next_delta(self) -> engine_pb2.RequestDelta:
        """The next delta; raises Unavailable when the worker failed, WorkerRefused when it refused."""
        event = await self.events.get()
        if isinstance(event, RouterError):
            self.finished = True
            raise event
        if event.finish_reason:
            self.finished = True
        return event

    def abort(self) -> None:
        """Tell the worker to stop the request and free its blocks and slots (no-op once finished)."""
        if not self.finished:
            self.finished = True
            self.worker.abort(self.engine_request_id)


class _WorkerGone(Exception):
    """The session ended; the message says why, for logs and for the clients it fails."""


class _IncompatibleWorker(_WorkerGone):
    """The worker serves a model this router cannot tokenize for; it is retried in case it restarts."""


class WorkerConnection:
    def __init__(self, address: str, tokenizer_vocab_size: int, timing: Timing,
                 on_state_change: Callable[[], None]):
        self.address = address
        self.ready = False
        self.info: engine_pb2.EngineInfo | None = None
        self.load = None  # the EngineLoad of the latest step (or GetInfo)
        self._tokenizer_vocab_size = tokenizer_vocab_size
        self._timing = timing
        self._on_state_change = on_state_change
        self._inbox: asyncio.Queue = asyncio.Queue()  # ("add", handle, AddRequest) | ("abort", engine id)
        self._routes: dict[str, RequestHandle] = {}
        self._stub: engine_pb2_grpc.EngineStub | None = None
        self._task: asyncio.Task | None = None
        self._last_problem = ""

    @property
    def num_in_flight(self) -> int:
        """Requests this router has on the worker, counting those not yet sent."""
        return len(self._routes) + self._inbox.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, engine_request_id: str, prompt_token_ids: list[int],
               sampling: engine_pb2.SamplingConfig) -> RequestHandle:
        handle = RequestHandle(self, engine_request_id)
        add = engine_pb2.AddRequest(request_id=engine_request_id, prompt_token_ids=prompt_token_ids,
                                    sampling=sampling)
        self._inbox.put_nowait(("add", handle, add))
        return handle

    def abort(self, engine_request_id: str) -> None:
        self._inbox.put_nowait(("abort", engine_request_id))

    async def fetch_info(self) -> engine_pb2.EngineInfo | None:
        """Fresh EngineInfo (live load) from the worker, or None if it is not connected or does not answer."""
        stub = self._stub
        if stub is None or not self.ready:
            return None
        try:
            return await stub.GetInfo(engine_pb2.GetInfoRequest(), timeout=self._timing.rpc_timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def _run(self) -> None:
        delay = self._timing.reconnect_min_s
        while True:
            refused = False
            try:
                await self._session()
                problem = "the worker closed the stream"
            except _IncompatibleWorker as e:
                problem, refused = str(e), True
            except _WorkerGone as e:
                problem = str(e)
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name}: {e.details()}"
            except asyncio.CancelledError:
                self._fail_all("the router is shutting down")
                raise
            except Exception as e:  # a bug here must not leave clients hanging
                logger.exception("worker %s: connection task failed", self.address)
                problem = f"internal router error ({type(e).__name__})"
            finally:
                was_ready = self.ready
                self._set_ready(False)
                self._stub = None
            self._fail_all(f"worker group {self.address} failed ({problem}); retry the request")
            if refused and problem != self._last_problem:
                logger.error("refusing worker %s: %s (checking again every %.1f s)", self.address, problem,
                             self._timing.reconnect_max_s)
            elif was_ready or problem != self._last_problem:
                logger.warning("worker %s: %s; reconnecting", self.address, problem)
            self._last_problem = problem
            if was_ready:
                delay = self._timing.reconnect_min_s
            wait, delay = delay, min(delay * 2, self._timing.reconnect_max_s)
            await self._refuse_commands_for(wait)

    async def _session(self) -> None:
        async with grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            info = await stub.GetInfo(engine_pb2.GetInfoRequest(), timeout=self._timing.rpc_timeout_s)
            self._check_compatible(info)
            call = stub.Connect()
            self.info, self.load, self._stub = info, info.load, stub
            self._set_ready(True)
            logger.info("worker %s ready: model=%s vocab=%d max_model_len=%d tp=%d k=%d", self.address,
                        info.model_name, info.vocab_size, info.max_model_len, info.tensor_parallel_size,
                        info.speculative_tokens)
            await self._pump(call)

    def _check_compatible(self, info: engine_pb2.EngineInfo) -> None:
        if self._tokenizer_vocab_size > info.vocab_size:
            raise _IncompatibleWorker(
                f"the router's tokenizer has {self._tokenizer_vocab_size} tokens but the worker's model "
                f"{info.model_name!r} has vocab_size {info.vocab_size}; start the router with the same "
                f"--model folder as the worker")

    async def _pump(self, call) -> None:
        """Until the stream breaks: send queued commands, route incoming step outputs."""
        read = get = None
        try:
            while True:
                read = read or asyncio.ensure_future(call.read())
                get = get or asyncio.ensure_future(self._inbox.get())
                done, _ = await asyncio.wait((read, get), return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    command, get = get.result(), None
                    await self._send(call, command)
                if read in done:
                    try:
                        message = read.result()
                    except asyncio.CancelledError:  # the call was cancelled under us, not this task
                        raise _WorkerGone("the stream was cancelled") from None
                    read = None
                    if message is grpc.aio.EOF:
                        raise _WorkerGone("the worker ended the stream")
                    self._route(message)
        finally:
            if read is not None:
                read.cancel()
            if get is not None:
                if get.done() and not get.cancelled():
                    self._refuse(get.result())
                get.cancel()
            call.cancel()

    async def _send(self, call, command) -> None:
        if command[0] == "add":
            _, handle, add = command
            self._routes[add.request_id] = handle
            await self._write(call, engine_pb2.EngineRequest(add=add))
        else:
            engine_request_id = command[1]
            if self._routes.pop(engine_request_id, None) is not None:
                abort = engine_pb2.AbortRequest(request_id=engine_request_id)
                await self._write(call, engine_pb2.EngineRequest(abort=abort))

    @staticmethod
    async def _write(call, request: engine_pb2.EngineRequest) -> None:
        try:
            await call.write(request)
        except asyncio.InvalidStateError:  # the call already ended; say how
            raise _WorkerGone(f"the stream ended ({(await call.code()).name}: {await call.details()})") from None

    def _route(self, message: engine_pb2.EngineResponse) -> None:
        kind = message.WhichOneof("kind")
        if kind == "step":
            self.load = message.step.load
            for delta in message.step.deltas:
                handle = self._routes.get(delta.request_id)
                if handle is None:
                    continue  # aborted by us a moment ago
                if delta.finish_reason:
                    del self._routes[delta.request_id]
                handle.events.put_nowait(delta)
        elif kind == "error":
            error = message.error
            handle = self._routes.pop(error.request_id, None)
            if handle is None:
                logger.warning("worker %s: error for unknown request %r: %s", self.address, error.request_id,
                               error.message)
                return
            handle.events.put_nowait(WorkerRefused(error.code, error.message))

    def _fail_all(self, message: str) -> None:
        routes, self._routes = self._routes, {}
        for handle in routes.values():
            handle.events.put_nowait(Unavailable(message))
        while not self._inbox.empty():
            self._refuse(self._inbox.get_nowait())

    def _refuse(self, command) -> None:
        if command[0] == "add":
            command[1].events.put_nowait(Unavailable(f"worker group {self.address} is not connected; retry"))

    async def _refuse_commands_for(self, seconds: float) -> None:
        """Wait out the backoff while failing any request submitted in the meantime (a race with pick)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            get = asyncio.ensure_future(self._inbox.get())
            done, _ = await asyncio.wait((get,), timeout=remaining)
            if get not in done:
                get.cancel()  # a cancelled Queue.get leaves its item in the queue
                return
            self._refuse(get.result())

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self._on_state_change()
