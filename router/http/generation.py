"""What /v1/completions and /v1/chat/completions share once their requests are parsed.

`prepare_prompts` runs every prompt through the request path's preparation (tokens, length checks)
before anything is admitted, so a bad prompt anywhere in the list is a 400 with nothing started.
`respond` runs them and answers either with one JSON body or with an SSE stream of chunks, both
built by the endpoint's choice objects. An error after the stream has started is sent as a last
`data: {"error": ...}` event before `[DONE]`, as vLLM does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from aiohttp import web

from nextserve.v1 import common_pb2
from router.errors import InvalidArgument, RouterError
from router.http.errors import internal_reply, reply_for
from router.http.prompt_runs import PromptRuns
from router.http.request_fields import Streaming
from router.http.sse import EventStream
from router.http.state import state_of
from router.request_path import PreparedRequest, RequestPath
from router.validation import GenerateSpec, RequestLimits

logger = logging.getLogger("nextserve.router.http")

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_ABORT: "abort"}


class Choice(Protocol):
    prompt_tokens: int
    completion_tokens: int

    def on_response(self, response) -> list[dict]:
        """Take one response; -> the choice objects of the stream chunks it makes."""

    def final(self) -> dict:
        """The choice object of the whole (non-streamed) answer."""


@dataclass(frozen=True)
class Envelope:
    """The fields around the choices: id, object type, creation time and model."""

    id: str
    object: str
    chunk_object: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, object_: str, chunk_object: str, model: str, request_id: str) -> "Envelope":
        return cls(f"{prefix}-{request_id}", object_, chunk_object, model, int(time.time()))

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def complete(self, choices: list[dict], usage: dict) -> dict:
        return {**self._head(self.object), "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        payload = {**self._head(self.chunk_object), "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return payload


def stop_reason(response) -> str | int | None:
    """vLLM's `stop_reason`: the stop string or stop token that ended the choice."""
    if response.matched_stop:
        return response.matched_stop
    return response.matched_stop_token_id if response.HasField("matched_stop_token_id") else None


def usage_of(choices: list[Choice]) -> dict:
    prompt = sum(choice.prompt_tokens for choice in choices)
    completion = sum(choice.completion_tokens for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_request_ids(request: web.Request, count: int) -> list[tuple[str, str]]:
    """(request id, the client's id or "") per prompt: the X-Request-Id header's (suffixed by the
    prompt's index when there are several), or a fresh one."""
    state = state_of(request)
    client = state.client_request_id
    base = client or state.request_id
    if count == 1:
        return [(base, client)]
    return [(f"{base}-{index}", f"{client}-{index}" if client else "") for index in range(count)]


async def prepare_prompts(path: RequestPath, specs: list[GenerateSpec], ids: list[str], limits: RequestLimits,
                          rename: Callable[[InvalidArgument, int], InvalidArgument]) -> list[PreparedRequest]:
    prepared = []
    for index, (spec, request_id) in enumerate(zip(specs, ids)):
        try:
            prepared.append(await path.prepare(spec, request_id, limits))
        except InvalidArgument as e:
            raise rename(e, index) from None
    return prepared


async def respond(path: RequestPath, metrics, request: web.Request, prepared: list[PreparedRequest],
                  choices: list[Choice], envelope: Envelope, streaming: Streaming) -> web.StreamResponse:
    state = state_of(request)
    headers = {"X-Request-Id": state.request_id}
    async with PromptRuns(path, prepared, metrics, state.timers, state.started) as runs:
        if not streaming.stream:
            async for index, response in runs.responses():
                choices[index].on_response(response)
            return web.json_response(envelope.complete([choice.final() for choice in choices], usage_of(choices)),
                                     headers=headers)
        await runs.started()  # a full queue or no worker is still a status, not a broken stream
        events = await EventStream.open(request, headers)
        try:
            async for index, response in runs.responses():
                for choice in choices[index].on_response(response):
                    await events.send(envelope.chunk([choice]))
            if streaming.include_usage:
                await events.send(envelope.chunk([], usage_of(choices)))
        except ConnectionResetError:
            raise  # the client went away: nothing left to tell it
        except RouterError as e:
            reply = reply_for(e)
            state.status_name = reply.status_name
            logger.warning("request %s: stream ended by %s: %s", state.request_id, reply.status_name, e.message)
            await events.send(reply.body)
        except Exception:
            logger.exception("request %s: stream failed with an unexpected error", state.request_id)
            reply = internal_reply(state.request_id)
            state.status_name = reply.status_name
            await events.send(reply.body)
        await events.close()
        return events.response
