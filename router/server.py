"""The public `nextserve.v1.Generation` service: a thin adapter over the request path.

protobuf -> validated spec -> `RequestPath` (tokens, admission, a worker, detokenization) ->
GenerateResponse chunks. Errors are raised as `router.errors` exceptions; the error interceptor
turns them into statuses.
"""

from __future__ import annotations

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from router.errors import InvalidArgument
from router.request_path import RequestPath
from router.validation import Prompt, parse_chat_messages, parse_generate_request


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, path: RequestPath):
        self.path = path

    async def Generate(self, request: generation_pb2.GenerateRequest, context):
        request_id = self.path.start_request(request.request_id)
        limits = self.path.limits()
        prepared = await self.path.prepare(parse_generate_request(request, limits), request_id, limits)
        async with self.path.run(prepared) as stream:
            # Cancellation and deadlines cancel this handler inside the block, which aborts the request.
            async for response in stream:
                yield response

    async def Tokenize(self, request: generation_pb2.TokenizeRequest, context) -> generation_pb2.TokenizeResponse:
        if bool(request.text) == bool(request.messages):
            raise InvalidArgument("prompt", "give exactly one of text and messages")
        if request.text:
            prompt = Prompt(text=request.text)
        else:
            add_generation_prompt = (request.add_generation_prompt if request.HasField("add_generation_prompt")
                                     else True)
            prompt = Prompt(messages=parse_chat_messages(request.messages), add_generation_prompt=add_generation_prompt)
        rendered, token_ids = await self.path.encode(prompt)
        tokenizer = self.path.tokenizer
        return generation_pb2.TokenizeResponse(
            token_ids=token_ids, tokens=[tokenizer.token_text(token_id) for token_id in token_ids], rendered=rendered)

    async def GetModelInfo(self, request, context) -> generation_pb2.GetModelInfoResponse:
        return await self.path.model_info()
