"""The fields /v1/completions and /v1/chat/completions share, read into a GenerateRequest.

OpenAI's sampling fields plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `min_tokens`, `skip_special_tokens`) carry the proto's names, so the shared
validation names them as the client wrote them. Fields OpenAI defines that this server does not
implement are refused by name rather than silently ignored; unknown fields are ignored, as vLLM
does.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextserve.v1 import generation_pb2
from router.errors import InvalidArgument
from router.http.errors import model_not_found
from router.http.fields import UINT64, Body

_NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_INTEGERS = ("top_k", "min_tokens")


@dataclass(frozen=True)
class Streaming:
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def check_model(body: Body, served_names: tuple[str, ...]) -> None:
    """`model` may be left out; given, it must name the served model (its folder name or path)."""
    model = body.string("model")
    if model is not None and model not in served_names:
        raise model_not_found(model, served_names[0])


def read_streaming(body: Body) -> Streaming:
    stream = body.boolean("stream", False)
    options = body.obj("stream_options")
    if options is not None and not stream:
        raise InvalidArgument("stream_options", "only goes with stream: true")
    include_usage = bool(options and options.boolean("include_usage", False))
    return Streaming(stream, include_usage)


def read_common(body: Body, max_tokens_keys: tuple[str, ...] = ("max_tokens",)) -> generation_pb2.GenerateRequest:
    """A GenerateRequest with the sampling and stopping fields set (no prompt yet)."""
    n = body.integer("n")
    if n is not None and n != 1:
        raise InvalidArgument("n", f"only n = 1 is supported, got {n}; send the request n times instead")
    if body.has("logit_bias") and body.get("logit_bias") != {}:
        raise InvalidArgument("logit_bias", "is not supported by this server")
    request = generation_pb2.GenerateRequest()
    for key in _NUMBERS:
        value = body.number(key)
        if value is not None:
            setattr(request, key, value)
    for key in _INTEGERS:
        value = body.integer(key)
        if value is not None:
            setattr(request, key, value)
    for key in max_tokens_keys:  # chat: max_completion_tokens wins over the older max_tokens
        value = body.integer(key)
        if value is not None:
            if value < 1:
                raise InvalidArgument(key, f"must be >= 1, got {value}")
            request.max_tokens = value
            break
    seed = body.integer("seed", UINT64)
    if seed is not None:
        request.seed = seed
    request.stop.extend(body.strings("stop"))
    request.stop_token_ids.extend(body.integers("stop_token_ids"))
    request.ignore_eos = body.boolean("ignore_eos", False)
    skip = body.boolean("skip_special_tokens")
    if skip is not None:
        request.skip_special_tokens = skip
    return request
