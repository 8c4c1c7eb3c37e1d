"""The Engine servicer: a thin adapter between the routers' streams and the engine loop."""

import asyncio
import itertools
import logging
from pathlib import Path

import grpc

from nextserve.v1 import engine_pb2, engine_pb2_grpc
from worker.server.convert import engine_load, request_delta, sampling_params
from worker.server.engine_loop import Connection, EngineLoop

logger = logging.getLogger(__name__)

_CLOSE = object()


class EngineService(engine_pb2_grpc.EngineServicer):
    """Registered before the model loads (gRPC wants its handlers before start); calls made
    before `attach` get UNAVAILABLE."""

    def __init__(self, model_dir: str, dtype: str, tensor_parallel_size: int):
        self.loop: EngineLoop | None = None
        self.model_name = Path(model_dir).name
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self._ids = itertools.count(1)

    def attach(self, loop: EngineLoop) -> None:
        self.loop = loop

    async def _require_ready(self, context) -> None:
        if self.loop is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is still loading the model")

    async def GetInfo(self, request, context) -> engine_pb2.EngineInfo:
        await self._require_ready(context)
        engine = self.loop.engine
        return engine_pb2.EngineInfo(
            model_name=self.model_name,
            vocab_size=engine.model_config.vocab_size,
            max_model_len=engine.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            speculative_tokens=engine.config.speculative_tokens,
            eos_token_ids=engine.model_config.eos_token_ids,
            load=engine_load(engine.stats()),
            dtype=self.dtype,
        )

    async def Connect(self, request_iterator, context):
        await self._require_ready(context)
        outbox: asyncio.Queue = asyncio.Queue()
        conn = self._connection(outbox, asyncio.get_running_loop())
        logger.info("router connection %d opened (%s)", conn.id, context.peer())
        reader = asyncio.create_task(self._read(request_iterator, conn, outbox))
        try:
            while (message := await outbox.get()) is not _CLOSE:
                yield message
        finally:
            reader.cancel()
            self.loop.drop(conn)
            logger.info("router connection %d closed; its %d requests aborted", conn.id, len(conn.request_ids))

    def _connection(self, outbox: asyncio.Queue, event_loop: asyncio.AbstractEventLoop) -> Connection:
        def deliver(step_id, items, stats):
            message = engine_pb2.EngineResponse(step=engine_pb2.StepOutputs(
                step_id=step_id, deltas=[request_delta(rid, out) for rid, out in items], load=engine_load(stats)))
            event_loop.call_soon_threadsafe(outbox.put_nowait, message)

        def fail(request_id, message, internal):
            code = grpc.StatusCode.INTERNAL if internal else grpc.StatusCode.INVALID_ARGUMENT
            error = engine_pb2.RequestError(request_id=request_id, code=code.value[0], message=message)
            event_loop.call_soon_threadsafe(outbox.put_nowait, engine_pb2.EngineResponse(error=error))

        return Connection(next(self._ids), deliver, fail)

    async def _read(self, request_iterator, conn: Connection, outbox: asyncio.Queue) -> None:
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "add":
                    self._add(conn, request.add)
                elif kind == "abort":
                    self.loop.abort(conn, request.abort.request_id)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            outbox.put_nowait(_CLOSE)

    def _add(self, conn: Connection, add: engine_pb2.AddRequest) -> None:
        try:
            params = sampling_params(add.sampling)
        except ValueError as e:
            conn.fail(add.request_id, str(e), False)
            return
        self.loop.add(conn, add.request_id, list(add.prompt_token_ids), params)
