"""The public `nextserve.v1.Generation` service: a thin adapter.

protobuf -> validated spec -> tokens -> admission -> a worker -> GenerateResponse chunks. Errors are
raised as `router.errors` exceptions; the error interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
import uuid

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from router.admission import Admission
from router.config import RouterConfig
from router.errors import InvalidArgument, Unavailable
from router.request_log import current_request_id
from router.responses import ResponseBuilder
from router.tokenizer import RouterTokenizer
from router.validation import (
    Prompt, RequestLimits, check_request_id, parse_chat_messages, parse_generate_request, resolve_max_tokens,
    to_sampling_config,
)
from router.workers import NO_WORKER_READY, WorkerPool, summed_load

# Prompts longer than this are tokenized on a thread, so one huge prompt does not stall every stream.
_TOKENIZE_INLINE_CHARS = 16_384


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, pool: WorkerPool, admission: Admission):
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.admission = admission

    async def Generate(self, request: generation_pb2.GenerateRequest, context):
        request_id = check_request_id(request.request_id) or uuid.uuid4().hex
        current_request_id.set(request_id)
        limits = self._limits()
        spec = parse_generate_request(request, limits)
        prompt_token_ids = await self._tokenize(spec.prompt)
        max_tokens = resolve_max_tokens(spec, len(prompt_token_ids), limits)
        sampling = to_sampling_config(spec.sampling, max_tokens)
        async with self.admission.admit(spec.request_id):
            # Unique per submission (a client may reuse its id as soon as a request ends), and led by
            # the request id so that the worker's log lines can be found by it.
            handle = self.pool.submit(f"{request_id}.{uuid.uuid4().hex}", prompt_token_ids, sampling)
            builder = ResponseBuilder(request_id, self.tokenizer, spec.stop, spec.skip_special_tokens,
                                      spec.sampling.min_tokens, len(prompt_token_ids))
            try:
                while not builder.finished:
                    response = builder.on_delta(await handle.next_delta())
                    if response.token_ids or builder.finished:
                        yield response
            finally:
                # Runs on a stop string, on client cancellation and on deadlines (the handler is
                # cancelled): the worker frees the request's blocks and slots. No-op once finished.
                handle.abort()

    async def Tokenize(self, request: generation_pb2.TokenizeRequest, context) -> generation_pb2.TokenizeResponse:
        if bool(request.text) == bool(request.messages):
            raise InvalidArgument("prompt", "give exactly one of text and messages")
        if request.text:
            prompt = Prompt(text=request.text)
        else:
            add_generation_prompt = (request.add_generation_prompt if request.HasField("add_generation_prompt")
                                     else True)
            prompt = Prompt(messages=parse_chat_messages(request.messages), add_generation_prompt=add_generation_prompt)
        rendered, token_ids = await self._run_sized(self._encode, prompt)
        return generation_pb2.TokenizeResponse(
            token_ids=token_ids, tokens=[self.tokenizer.token_text(token_id) for token_id in token_ids],
            rendered=rendered)

    async def GetModelInfo(self, request, context) -> generation_pb2.GetModelInfoResponse:
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

    def _limits(self) -> RequestLimits:
        vocab_size, max_model_len = self.pool.request_limits()
        return RequestLimits(vocab_size=vocab_size, max_model_len=max_model_len,
                             max_prompt_tokens=self.config.max_prompt_tokens,
                             max_stop_strings=self.config.max_stop_strings,
                             max_stop_string_bytes=self.config.max_stop_string_bytes)

    async def _tokenize(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        _, token_ids = await self._run_sized(self._encode, prompt)
        return token_ids

    def _encode(self, prompt: Prompt) -> tuple[str, list[int]]:
        if prompt.text is not None:
            return "", self.tokenizer.encode(prompt.text)
        return self.tokenizer.encode_chat(list(prompt.messages), prompt.add_generation_prompt)

    @staticmethod
    async def _run_sized(function, prompt: Prompt):
        size = len(prompt.text) if prompt.text is not None else sum(len(m["content"]) for m in prompt.messages or ())
        if size <= _TOKENIZE_INLINE_CHARS:
            return function(prompt)
        return await asyncio.to_thread(function, prompt)
