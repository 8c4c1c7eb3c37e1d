"""A scripted stand-in for a worker's Engine service, for router tests.

Each added request gets `tokens_per_step` tokens per step from `script` (cycled), one step every
`step_interval_s`, until max_tokens (LENGTH) or a stop token (STOP). It records what routers sent
(adds, aborts) and reports a load in which every live request holds 2 KV blocks and one slot group,
so tests can check that aborts give everything back. Runs in-process (`FakeWorker`) or as a process
(`python tests/router/fake_worker.py --port N`), which tests kill -9 to simulate a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from dataclasses import dataclass, field

import grpc

from nextserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc

TOTAL_BLOCKS = 64
TOTAL_SLOT_GROUPS = 8


@dataclass
class _Live:
    add: engine_pb2.AddRequest
    tokens: itertools.cycle
    generated: list[int] = field(default_factory=list)


def prompt_logprobs(prompt_token_ids, num_top: int) -> list[common_pb2.TokenLogprob]:
    """Made-up logprobs of prompt tokens 1.. (-0.25 per position; alternatives the ids after it, less likely)."""
    return [common_pb2.TokenLogprob(token_id=token, logprob=-0.25 * position,
                                    top=[common_pb2.TopLogprob(token_id=token + 1 + i, logprob=-0.25 * position - 1 - i)
                                         for i in range(num_top)])
            for position, token in enumerate(prompt_token_ids[1:], start=1)]


class FakeEngine(engine_pb2_grpc.EngineServicer):
    def __init__(self, vocab_size: int = 1024, max_model_len: int = 256, script: list[int] | None = None,
                 tokens_per_step: int = 1, step_interval_s: float = 0.01, eos_token_ids: tuple[int, ...] = (),
                 speculative_tokens: int = 0, refuse_message: str | None = None, echo_prompt: bool = False):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.script = script or [39, 68, 286, 78]
        self.tokens_per_step = tokens_per_step
        self.step_interval_s = step_interval_s
        self.eos_token_ids = eos_token_ids
        self.speculative_tokens = speculative_tokens
        self.refuse_message = refuse_message  # set: every add gets a RequestError (INVALID_ARGUMENT)
        self.echo_prompt = echo_prompt  # each request's script is its own prompt (to catch cross-talk)
        self.adds: list[engine_pb2.AddRequest] = []
        self.aborts: list[str] = []
        self.num_connections = 0
        self._live: dict[tuple[int, str], _Live] = {}
        self._step_ids = itertools.count(1)

    def load(self) -> common_pb2.EngineLoad:
        running = len(self._live)
        return common_pb2.EngineLoad(
            running_requests=running, free_kv_blocks=max(0, TOTAL_BLOCKS - 2 * running), total_kv_blocks=TOTAL_BLOCKS,
            free_gdn_slot_groups=max(0, TOTAL_SLOT_GROUPS - running), total_gdn_slot_groups=TOTAL_SLOT_GROUPS)

    async def GetInfo(self, request, context):
        return engine_pb2.EngineInfo(
            model_name="fake", vocab_size=self.vocab_size, max_model_len=self.max_model_len, tensor_parallel_size=1,
            speculative_tokens=self.speculative_tokens, eos_token_ids=self.eos_token_ids, load=self.load(),
            dtype="float32")

    async def Connect(self, request_iterator, context):
        self.num_connections += 1
        connection = self.num_connections
        outbox: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, connection, outbox))
        try:
            while not reader.done() or not outbox.empty():
                await asyncio.sleep(self.step_interval_s)
                while not outbox.empty():
                    yield outbox.get_nowait()
                deltas = self._step(connection)
                if deltas:
                    yield engine_pb2.EngineResponse(step=engine_pb2.StepOutputs(
                        step_id=next(self._step_ids), deltas=deltas, load=self.load()))
        finally:
            reader.cancel()
            for key in [key for key in self._live if key[0] == connection]:
                del self._live[key]

    async def _read(self, request_iterator, connection: int, outbox: asyncio.Queue) -> None:
        async for request in request_iterator:
            if request.WhichOneof("kind") == "add":
                add = request.add
                self.adds.append(add)
                refusal = self.refuse_message or ("duplicate request id" if (connection, add.request_id) in self._live
                                                  else None)
                if refusal:
                    outbox.put_nowait(engine_pb2.EngineResponse(error=engine_pb2.RequestError(
                        request_id=add.request_id, code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=refusal)))
                    continue
                script = list(add.prompt_token_ids) if self.echo_prompt else self.script
                self._live[(connection, add.request_id)] = _Live(add, itertools.cycle(script))
            else:
                self.aborts.append(request.abort.request_id)
                if self._live.pop((connection, request.abort.request_id), None) is not None:
                    outbox.put_nowait(engine_pb2.EngineResponse(step=engine_pb2.StepOutputs(
                        deltas=[engine_pb2.RequestDelta(request_id=request.abort.request_id,
                                                        finish_reason=common_pb2.FINISH_REASON_ABORT)],
                        load=self.load())))

    def _step(self, connection: int) -> list[engine_pb2.RequestDelta]:
        deltas = []
        for key, live in list(self._live.items()):
            if key[0] != connection:
                continue
            delta = engine_pb2.RequestDelta(request_id=live.add.request_id,
                                            prompt_tokens=len(live.add.prompt_token_ids))
            sampling = live.add.sampling
            if sampling.HasField("prompt_logprobs") and not live.generated:
                delta.prompt_logprobs.extend(prompt_logprobs(live.add.prompt_token_ids, sampling.prompt_logprobs))
            for _ in range(self.tokens_per_step):
                token = next(live.tokens)
                live.generated.append(token)
                delta.token_ids.append(token)
                if sampling.HasField("logprobs"):
                    delta.logprobs.append(common_pb2.TokenLogprob(
                        token_id=token, logprob=-0.5,
                        top=[common_pb2.TopLogprob(token_id=token + i, logprob=-0.5 - i)
                             for i in range(sampling.logprobs)]))
                stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
                if token in stops and len(live.generated) >= sampling.min_tokens:
                    delta.finish_reason = common_pb2.FINISH_REASON_STOP
                    delta.matched_stop_token_id = token
                    break
                if len(live.generated) >= sampling.max_tokens:
                    delta.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    break
            delta.completion_tokens = len(live.generated)
            if delta.finish_reason:
                delta.speculative.CopyFrom(common_pb2.SpeculativeStats(
                    drafted_tokens=2, accepted_tokens=1, mean_accepted_length=1.5,
                    acceptance_rate_per_position=[0.5]))
                del self._live[key]
            deltas.append(delta)
        return deltas


class FakeWorker:
    """A FakeEngine on a local gRPC server; `stop` / `start` again on the same port simulate a restart.

    `stop_all` stops whatever a failed test left running: a gRPC server outliving its event loop
    hangs the next test's loop.
    """

    _running: set["FakeWorker"] = set()

    def __init__(self, engine: FakeEngine | None = None, port: int = 0):
        self.engine = engine or FakeEngine()
        self.port = port
        self.server: grpc.aio.Server | None = None

    @classmethod
    async def stop_all(cls) -> None:
        for worker in list(cls._running):
            await worker.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> "FakeWorker":
        self.server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServicer_to_server(self.engine, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        FakeWorker._running.add(self)
        return self

    async def stop(self) -> None:
        FakeWorker._running.discard(self)
        await self.server.stop(grace=None)


async def _serve(port: int, step_interval_s: float) -> None:
    worker = await FakeWorker(FakeEngine(step_interval_s=step_interval_s), port).start()
    print(f"fake worker listening on {worker.port}", flush=True)
    await worker.server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--step-interval-s", type=float, default=0.01)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.step_interval_s))
