"""POST /v1/chat/completions: messages through the model's chat template, OpenAI's chat shape.

Message content is a string or a list of text parts (joined with newlines, as vLLM does); other
part types are refused. `logprobs: true` with `top_logprobs` (0..20) returns per-token logprobs.
Without `max_tokens` / `max_completion_tokens` the answer may run to the model's length, as in vLLM.
Streams start with a chunk carrying the assistant role and end with one carrying the finish reason.
"""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from nextserve.v1 import generation_pb2
from router.errors import InvalidArgument
from router.http.fields import Body, parse_json_object, renamed
from router.http.generation import FINISH_REASONS, Envelope, choice_request_ids, prepare_prompts, respond, stop_reason
from router.http.logprobs import chat_logprobs
from router.http.state import state_of
from router.http.request_fields import check_model, read_common, read_streaming
from router.tokenizer import RouterTokenizer
from router.validation import parse_generate_request

MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens")


def _content(message: Body, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(f"messages[{index}].content", "must be a string or a list of content parts")
    texts = []
    for part_index, part in enumerate(content):
        name = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidArgument(name, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def read_messages(body: Body) -> list[generation_pb2.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} objects")
    read = []
    for index, item in enumerate(messages):
        if not isinstance(item, dict):
            raise InvalidArgument(f"messages[{index}]", "must be an object with role and content")
        message = Body(item, f"messages[{index}].")
        role = message.string("role")
        if role is None:
            raise InvalidArgument(f"messages[{index}].role", "is required")
        read.append(generation_pb2.ChatMessage(role=role, content=_content(message, index)))
    return read


def _field_renamer(max_tokens_key: str):
    def rename(error: InvalidArgument, index: int) -> InvalidArgument:
        if error.field == "logprobs":  # the count is top_logprobs here; logprobs is a switch
            return renamed(error, "top_logprobs")
        if error.field == "max_tokens":
            return renamed(error, max_tokens_key)
        if error.field in ("prompt", "text", "token_ids"):
            return renamed(error, "messages")
        return error

    return rename


class ChatChoice:
    def __init__(self, index: int, tokenizer: RouterTokenizer, prompt_tokens: int, with_logprobs: bool):
        self.index = index
        self._tokenizer = tokenizer
        self._with_logprobs = with_logprobs
        self._first = True
        self.content = ""
        self.logprobs: list[dict] = []
        self.finish_reason = None
        self.stop_reason = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def _chunk(self, delta: dict, logprobs: list[dict] | None = None) -> dict:
        return {"index": self.index, "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}

    def on_response(self, response) -> list[dict]:
        chunks = []
        if self._first:
            self._first = False
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        logprobs = chat_logprobs(self._tokenizer, response.logprobs) if self._with_logprobs else None
        self.content += response.text
        if logprobs:
            self.logprobs += logprobs
        if response.text or logprobs:
            chunks.append(self._chunk({"content": response.text}, logprobs))
        if response.finish_reason:
            self.finish_reason = FINISH_REASONS.get(response.finish_reason)
            self.stop_reason = stop_reason(response)
            self.prompt_tokens = response.usage.prompt_tokens
            self.completion_tokens = response.usage.completion_tokens
            chunks.append(self._chunk({}))
        return chunks

    def final(self) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.content},
                "logprobs": {"content": self.logprobs} if self._with_logprobs else None,
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}


async def chat_completions(api, request: web.Request) -> web.StreamResponse:
    body = Body(parse_json_object(await request.read()))
    check_model(body, api.served_names)
    streaming = read_streaming(body)
    if body.has("tools") and body.get("tools") != []:
        raise InvalidArgument("tools", "tool calling is not supported by this server")
    response_format = body.obj("response_format")
    if response_format is not None and response_format.get("type") not in (None, "text"):
        raise InvalidArgument("response_format", "only {\"type\": \"text\"} is supported")
    with_logprobs = body.boolean("logprobs", False)
    top_logprobs = body.integer("top_logprobs")
    if top_logprobs is not None and not with_logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    max_tokens_key = next((key for key in MAX_TOKENS_KEYS if body.has(key)), "max_tokens")
    generate = read_common(body, MAX_TOKENS_KEYS)
    generate.messages.extend(read_messages(body))
    generate.add_generation_prompt = body.boolean("add_generation_prompt", True)
    if with_logprobs:
        generate.logprobs = top_logprobs or 0
    [(request_id, client_id)] = choice_request_ids(request, 1)
    generate.request_id = client_id
    rename = _field_renamer(max_tokens_key)
    path = api.path
    limits = path.limits()
    try:
        spec = parse_generate_request(generate, limits)
    except InvalidArgument as e:
        raise rename(e, 0) from None
    spec = replace(spec, default_max_tokens=None)  # to the model's length, as vLLM
    [prepared] = await prepare_prompts(path, [spec], [request_id], limits, rename)
    choice = ChatChoice(0, path.tokenizer, len(prepared.prompt_token_ids), with_logprobs)
    envelope = Envelope.new("chatcmpl", "chat.completion", "chat.completion.chunk", api.model_name,
                            state_of(request).request_id)
    return await respond(path, api.metrics, request, [prepared], [choice], envelope, streaming)
