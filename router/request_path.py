"""The one request path behind both public APIs (gRPC `Generation` and the OpenAI-style HTTP API).

validated spec -> `prepare` (request id, tokenization and chat template, length checks) -> `run`
(admission, a worker, detokenization and stop strings, abort on the way out) -> GenerateResponse
chunks. The adapters only translate their wire format into a `GenerateSpec` and the chunks back.
Preparing and running are two steps so that an HTTP adapter can still answer with an error status
(bad prompt, full queue, no worker) before it commits to a 200 stream.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from nextserve.v1 import engine_pb2, generation_pb2
from router.admission import Admission
from router.config import RouterConfig
from router.errors import Unavailable
from router.request_log import current_request_id
from router.responses import ResponseBuilder
from router.tokenizer import RouterTokenizer
from router.validation import (
    GenerateSpec, Prompt, RequestLimits, check_request_id, resolve_max_tokens, to_sampling_config,
)
from router.worker_connection import RequestHandle
from router.workers import NO_WORKER_READY, WorkerPool, summed_load

# Prompts longer than this are tokenized on a thread, so one huge prompt does not stall every stream.
_TOKENIZE_INLINE_CHARS = 16_384


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready for admission: its ids, its tokens and what to send the engine."""

    request_id: str  # the client's or a made-up one: logs, responses
    spec: GenerateSpec
    prompt_token_ids: list[int]
    sampling: engine_pb2.SamplingConfig


class GenerationStream:
    """One admitted request's responses, in order; the last has a finish reason."""

    def __init__(self, prepared: PreparedRequest, handle: RequestHandle, builder: ResponseBuilder):
        self.prepared = prepared
        self._handle = handle
        self._builder = builder

    def __aiter__(self) -> AsyncIterator[generation_pb2.GenerateResponse]:
        return self._responses()

    async def _responses(self):
        while not self._builder.finished:
            response = self._builder.on_delta(await self._handle.next_delta())
            if response.token_ids or response.prompt_logprobs or self._builder.finished:
                yield response


class RequestPath:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, pool: WorkerPool, admission: Admission):
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.admission = admission

    @staticmethod
    def start_request(client_request_id: str = "") -> str:
        """The request's id (the client's, checked, or a fresh one), set for this task's log lines."""
        request_id = check_request_id(client_request_id) or uuid.uuid4().hex
        current_request_id.set(request_id)
        return request_id

    def limits(self) -> RequestLimits:
        """What requests may ask for now; Unavailable while no worker is ready."""
        vocab_size, max_model_len = self.pool.request_limits()
        return RequestLimits(vocab_size=vocab_size, max_model_len=max_model_len,
                             max_prompt_tokens=self.config.max_prompt_tokens,
                             max_stop_strings=self.config.max_stop_strings,
                             max_stop_string_bytes=self.config.max_stop_string_bytes)

    async def prepare(self, spec: GenerateSpec, request_id: str, limits: RequestLimits) -> PreparedRequest:
        """Tokenize (chat template included) and check the prompt against the model's length."""
        prompt_token_ids = await self.prompt_token_ids(spec.prompt)
        max_tokens = resolve_max_tokens(spec, len(prompt_token_ids), limits)
        return PreparedRequest(request_id, spec, prompt_token_ids, to_sampling_config(spec.sampling, max_tokens))

    @asynccontextmanager
    async def run(self, prepared: PreparedRequest):
        """Admit the request (waiting in the queue, or ResourceExhausted), send it to a worker
        (Unavailable if none is ready) and yield its GenerationStream. Leaving the block for any
        reason (the end, a stop string, a cancelled task, a client gone) aborts it on the worker,
        which frees its blocks and slots; a no-op once finished."""
        spec = prepared.spec
        async with self.admission.admit(spec.request_id):
            # Unique per submission (a client may reuse its id as soon as a request ends), and led by
            # the request id so that the worker's log lines can be found by it.
            handle = self.pool.submit(f"{prepared.request_id}.{uuid.uuid4().hex}", prepared.prompt_token_ids,
                                      prepared.sampling)
            builder = ResponseBuilder(prepared.request_id, self.tokenizer, spec.stop, spec.skip_special_tokens,
                                      spec.sampling.min_tokens, len(prepared.prompt_token_ids))
            try:
                yield GenerationStream(prepared, handle, builder)
            finally:
                handle.abort()

    async def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        _, token_ids = await self.encode(prompt)
        return token_ids

    async def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str, list[int]]:
        """(rendered chat prompt or "", token ids) for a text or chat prompt; long ones on a thread."""
        size = len(prompt.text) if prompt.text is not None else sum(len(m["content"]) for m in prompt.messages or ())
        if size <= _TOKENIZE_INLINE_CHARS:
            return self._encode(prompt, add_special_tokens)
        return await asyncio.to_thread(self._encode, prompt, add_special_tokens)

    def _encode(self, prompt: Prompt, add_special_tokens: bool) -> tuple[str, list[int]]:
        if prompt.text is not None:
            return "", self.tokenizer.encode(prompt.text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode_chat(list(prompt.messages), prompt.add_generation_prompt)

    async def model_info(self) -> generation_pb2.GetModelInfoResponse:
        """The served model and the live load of every ready worker; Unavailable if none answers."""
        infos = await self.pool.fresh_infos()
        if not infos:
            raise Unavailable(NO_WORKER_READY)
        first = infos[0]
        return generation_pb2.GetModelInfoResponse(
            model_name=self.config.model_name,
            max_model_len=min(info.max_model_len for info in infos),
            vocab_size=first.vocab_size,
            tensor_parallel_size=first.tensor_parallel_size,
            speculative_tokens=first.speculative_tokens,
            ready_workers=len(infos),
            load=summed_load(infos),
            router_in_flight=self.admission.num_in_flight,
        )
