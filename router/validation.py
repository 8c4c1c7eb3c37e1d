"""GenerateRequest -> a validated `GenerateSpec`, and the spec -> the engine's `SamplingConfig`.

Every check names the field as the proto spells it and the limit it broke, so a client can fix the
request without reading our source. Checks that need the prompt's length (max_tokens against
max_model_len) run after tokenization, in `resolve_max_tokens`.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from nextserve.v1 import engine_pb2, generation_pb2
from router.errors import InvalidArgument

CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestLimits:
    """What this router accepts (from RouterConfig) and what the served model can do (from EngineInfo)."""

    vocab_size: int
    max_model_len: int
    max_prompt_tokens: int | None = None
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, token_ids and messages is set."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    add_generation_prompt: bool = True

    @property
    def field(self) -> str:
        return "text" if self.text is not None else "token_ids" if self.token_ids is not None else "messages"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, shortened to fit the model
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class GenerateSpec:
    request_id: str  # the client's, or "" (the servicer makes one up)
    prompt: Prompt
    sampling: Sampling
    stop: tuple[str, ...]
    skip_special_tokens: bool
    # max_tokens when the request gives none (shortened to fit); None: as many as the model's length allows.
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS


def parse_generate_request(request: generation_pb2.GenerateRequest, limits: RequestLimits) -> GenerateSpec:
    """Raises InvalidArgument for the first bad field."""
    return GenerateSpec(
        request_id=check_request_id(request.request_id),
        prompt=_parse_prompt(request, limits.vocab_size),
        sampling=_parse_sampling(request, limits.vocab_size),
        stop=_parse_stop(request.stop, limits),
        skip_special_tokens=request.skip_special_tokens if request.HasField("skip_special_tokens") else True,
    )


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if any(unicodedata.category(char) == "Cc" for char in request_id):
        raise InvalidArgument("request_id", "must not contain control characters (newlines, tabs, NUL, ...)")
    return request_id


def parse_chat_messages(messages, field: str = "messages") -> tuple[dict, ...]:
    """Roles must be ones chat templates know; empty content is allowed (e.g. an empty system turn)."""
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(f"{field}[{index}].role",
                                  f"{message.role!r} is not one of {', '.join(CHAT_ROLES)}")
    return tuple({"role": message.role, "content": message.content} for message in messages)


def _parse_prompt(request: generation_pb2.GenerateRequest, vocab_size: int) -> Prompt:
    given = [name for name, present in (("text", request.text != ""), ("token_ids", len(request.token_ids) > 0),
                                        ("messages", len(request.messages) > 0)) if present]
    if len(given) != 1:
        got = " and ".join(given) if given else "none (all are empty)"
        raise InvalidArgument("prompt", f"give exactly one of text, token_ids and messages; got {got}")
    add_generation_prompt = (request.add_generation_prompt if request.HasField("add_generation_prompt")
                             else True)
    if request.text:
        return Prompt(text=request.text)
    if request.messages:
        return Prompt(messages=parse_chat_messages(request.messages), add_generation_prompt=add_generation_prompt)
    check_token_ids(request.token_ids, vocab_size, "token_ids")
    return Prompt(token_ids=tuple(request.token_ids))


def check_token_ids(token_ids, vocab_size: int, field: str) -> None:
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidArgument(f"{field}[{index}]",
                                  f"{token_id} is outside the model's vocabulary [0, {vocab_size})")


def _optional(request, name: str, default):
    return getattr(request, name) if request.HasField(name) else default


def _parse_sampling(request: generation_pb2.GenerateRequest, vocab_size: int) -> Sampling:
    temperature = _optional(request, "temperature", 1.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument("temperature", f"must be a finite number >= 0 (0 is greedy), got {temperature}")
    top_p = _optional(request, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p}")
    if request.top_k < -1:
        raise InvalidArgument("top_k", f"must be >= 1, or 0 / -1 to keep all tokens, got {request.top_k}")
    if not 0 <= request.min_p <= 1:
        raise InvalidArgument("min_p", f"must be in [0, 1], got {request.min_p}")
    repetition_penalty = _optional(request, "repetition_penalty", 1.0)
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise InvalidArgument("repetition_penalty", f"must be a finite number > 0 (1 is off), got {repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
            raise InvalidArgument(name, f"must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], got {value}")
    max_tokens = _optional(request, "max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("max_tokens", f"must be >= 1, got {max_tokens}")
    if request.min_tokens < 0:
        raise InvalidArgument("min_tokens", f"must be >= 0, got {request.min_tokens}")
    if max_tokens is not None and request.min_tokens > max_tokens:
        raise InvalidArgument("min_tokens", f"must be <= max_tokens ({max_tokens}), got {request.min_tokens}")
    check_token_ids(request.stop_token_ids, vocab_size, "stop_token_ids")
    logprobs = _optional(request, "logprobs", None)
    prompt_logprobs = _optional(request, "prompt_logprobs", None)
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise InvalidArgument(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
    return Sampling(
        temperature=temperature, top_k=request.top_k, top_p=top_p, min_p=request.min_p,
        repetition_penalty=repetition_penalty, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, seed=_optional(request, "seed", None),
        max_tokens=max_tokens, min_tokens=request.min_tokens, stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )


def _parse_stop(stop, limits: RequestLimits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument("stop", f"at most {limits.max_stop_strings} strings, got {len(stop)}")
    for index, text in enumerate(stop):
        if not text:
            raise InvalidArgument(f"stop[{index}]", "must not be empty")
        size = len(text.encode("utf-8"))
        if size > limits.max_stop_string_bytes:
            raise InvalidArgument(f"stop[{index}]",
                                  f"{size} bytes is over the limit of {limits.max_stop_string_bytes} bytes")
    return tuple(stop)


def resolve_max_tokens(spec: GenerateSpec, prompt_len: int, limits: RequestLimits) -> int:
    """Check the tokenized prompt against the model and return the max_tokens to send. An explicit
    max_tokens that does not fit is refused (like vLLM), not silently shortened; the default one is."""
    field = spec.prompt.field
    if prompt_len == 0:
        raise InvalidArgument(field, "the prompt is empty after tokenization")
    if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
        raise InvalidArgument(field, f"the prompt is {prompt_len} tokens; this router accepts at most "
                                     f"{limits.max_prompt_tokens}")
    if prompt_len >= limits.max_model_len:
        raise InvalidArgument(field, f"the prompt is {prompt_len} tokens, but the model's maximum length is "
                                     f"{limits.max_model_len} (prompt + output), leaving no room to generate")
    room = limits.max_model_len - prompt_len
    max_tokens = spec.sampling.max_tokens
    if max_tokens is None:
        max_tokens = room if spec.default_max_tokens is None else min(spec.default_max_tokens, room)
    elif max_tokens > room:
        raise InvalidArgument("max_tokens", f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the "
                                            f"model's maximum length of {limits.max_model_len}; "
                                            f"ask for at most {room}")
    if spec.sampling.min_tokens > max_tokens:
        raise InvalidArgument("min_tokens", f"must be <= max_tokens ({max_tokens}), got {spec.sampling.min_tokens}")
    return max_tokens


def to_sampling_config(sampling: Sampling, max_tokens: int) -> engine_pb2.SamplingConfig:
    config = engine_pb2.SamplingConfig(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, max_tokens=max_tokens, min_tokens=sampling.min_tokens,
        stop_token_ids=sampling.stop_token_ids, ignore_eos=sampling.ignore_eos,
    )
    if sampling.seed is not None:
        config.seed = sampling.seed
    if sampling.logprobs is not None:
        config.logprobs = sampling.logprobs
    if sampling.prompt_logprobs is not None:
        config.prompt_logprobs = sampling.prompt_logprobs
    return config
