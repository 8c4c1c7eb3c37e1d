"""Every bad field of a GenerateRequest -> InvalidArgument naming the field and its limit."""

import math

import pytest

from nextserve.v1 import generation_pb2
from router.errors import InvalidArgument
from router.validation import (
    DEFAULT_MAX_TOKENS, RequestLimits, parse_generate_request, resolve_max_tokens, to_sampling_config,
)

LIMITS = RequestLimits(vocab_size=1024, max_model_len=256, max_prompt_tokens=200)
Msg = generation_pb2.ChatMessage


def _request(**fields):
    fields.setdefault("text", "hello")
    return generation_pb2.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


# (case id, request fields, field named in the error, text the message must contain)
BAD = [
    ("no prompt", dict(text=None), "prompt", "exactly one"),
    ("text and token_ids", dict(token_ids=[1, 2]), "prompt", "text and token_ids"),
    ("text and messages", dict(messages=[Msg(role="user", content="x")]), "prompt", "text and messages"),
    ("negative token id", dict(text=None, token_ids=[5, -1]), "token_ids[1]", "[0, 1024)"),
    ("token id past vocab", dict(text=None, token_ids=[1024]), "token_ids[0]", "[0, 1024)"),
    ("bad role", dict(text=None, messages=[Msg(role="robot", content="x")]), "messages[0].role", "'robot'"),
    ("temperature nan", dict(temperature=math.nan), "temperature", ">= 0"),
    ("temperature inf", dict(temperature=math.inf), "temperature", "finite"),
    ("temperature negative", dict(temperature=-0.1), "temperature", ">= 0"),
    ("top_p zero", dict(top_p=0.0), "top_p", "(0, 1]"),
    ("top_p above one", dict(top_p=1.5), "top_p", "(0, 1]"),
    ("top_p nan", dict(top_p=math.nan), "top_p", "(0, 1]"),
    ("top_k below -1", dict(top_k=-2), "top_k", ">= 1"),
    ("min_p negative", dict(min_p=-0.01), "min_p", "[0, 1]"),
    ("min_p above one", dict(min_p=1.01), "min_p", "[0, 1]"),
    ("min_p nan", dict(min_p=math.nan), "min_p", "[0, 1]"),
    ("repetition_penalty zero", dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    ("repetition_penalty nan", dict(repetition_penalty=math.nan), "repetition_penalty", "> 0"),
    ("presence_penalty", dict(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
    ("frequency_penalty", dict(frequency_penalty=-3.0), "frequency_penalty", "[-2, 2]"),
    ("frequency_penalty nan", dict(frequency_penalty=math.nan), "frequency_penalty", "[-2, 2]"),
    ("max_tokens zero", dict(max_tokens=0), "max_tokens", ">= 1"),
    ("max_tokens negative", dict(max_tokens=-5), "max_tokens", ">= 1"),
    ("min_tokens negative", dict(min_tokens=-1), "min_tokens", ">= 0"),
    ("min_tokens above max_tokens", dict(max_tokens=4, min_tokens=5), "min_tokens", "max_tokens (4)"),
    ("too many stops", dict(stop=[f"s{i}" for i in range(17)]), "stop", "at most 16"),
    ("empty stop", dict(stop=["ok", ""]), "stop[1]", "empty"),
    ("long stop", dict(stop=["é" * 129]), "stop[0]", "258 bytes is over the limit of 256"),
    ("stop token past vocab", dict(stop_token_ids=[3, 5000]), "stop_token_ids[1]", "[0, 1024)"),
    ("negative stop token", dict(stop_token_ids=[-3]), "stop_token_ids[0]", "[0, 1024)"),
    ("logprobs negative", dict(logprobs=-1), "logprobs", "[0, 20]"),
    ("logprobs too many", dict(logprobs=21), "logprobs", "[0, 20]"),
    ("prompt_logprobs negative", dict(prompt_logprobs=-1), "prompt_logprobs", "[0, 20]"),
    ("prompt_logprobs too many", dict(prompt_logprobs=21), "prompt_logprobs", "[0, 20]"),
    ("request_id too long", dict(request_id="x" * 129), "request_id", "at most 128"),
    ("request_id control char", dict(request_id="abc\n"), "request_id", "control characters"),
    ("request_id NUL", dict(request_id="a\x00b"), "request_id", "control characters"),
]


@pytest.mark.parametrize("fields, field, needle", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_field_is_named(fields, field, needle):
    with pytest.raises(InvalidArgument) as error:
        parse_generate_request(_request(**fields), LIMITS)
    assert error.value.field == field
    assert needle in error.value.message and error.value.message.startswith(field)


def _resolve(prompt_len, **fields):
    spec = parse_generate_request(_request(**fields), LIMITS)
    return resolve_max_tokens(spec, prompt_len, LIMITS)


def test_max_tokens_past_the_model_is_refused_with_both_numbers():
    with pytest.raises(InvalidArgument) as error:
        _resolve(100, max_tokens=157)
    assert error.value.field == "max_tokens"
    assert "100 tokens" in error.value.message and "157" in error.value.message and "256" in error.value.message
    assert "at most 156" in error.value.message
    assert _resolve(100, max_tokens=156) == 156


def test_default_max_tokens_shrinks_to_fit():
    assert _resolve(10) == DEFAULT_MAX_TOKENS
    limits = RequestLimits(vocab_size=1024, max_model_len=256)
    spec = parse_generate_request(_request(), limits)
    assert resolve_max_tokens(spec, 250, limits) == 6


@pytest.mark.parametrize("prompt_len, needle", [(0, "empty"), (201, "at most 200")])
def test_prompt_length_limits(prompt_len, needle):
    with pytest.raises(InvalidArgument, match=needle) as error:
        _resolve(prompt_len)
    assert error.value.field == "text"


def test_prompt_as_long_as_the_model_is_refused():
    limits = RequestLimits(vocab_size=1024, max_model_len=256)
    spec = parse_generate_request(_request(text=None, token_ids=[1] * 256), limits)
    with pytest.raises(InvalidArgument, match="maximum length is 256") as error:
        resolve_max_tokens(spec, 256, limits)
    assert error.value.field == "token_ids"


def test_min_tokens_checked_against_the_resolved_default():
    with pytest.raises(InvalidArgument) as error:
        _resolve(10, min_tokens=DEFAULT_MAX_TOKENS + 1)
    assert error.value.field == "min_tokens"


def test_valid_request_maps_to_sampling_config():
    spec = parse_generate_request(_request(
        temperature=0.0, top_k=-1, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=-2.0,
        frequency_penalty=2.0, seed=7, max_tokens=32, min_tokens=2, stop=["\n\n"], stop_token_ids=[1002],
        ignore_eos=True, logprobs=0, prompt_logprobs=3, skip_special_tokens=False, request_id="req-1"), LIMITS)
    assert spec.request_id == "req-1" and spec.stop == ("\n\n",) and spec.skip_special_tokens is False
    config = to_sampling_config(spec.sampling, resolve_max_tokens(spec, 5, LIMITS))
    assert (config.temperature, config.top_k, config.max_tokens, config.min_tokens) == (0.0, -1, 32, 2)
    assert config.seed == 7 and config.HasField("logprobs") and config.logprobs == 0 and config.prompt_logprobs == 3
    assert list(config.stop_token_ids) == [1002] and config.ignore_eos
    assert config.top_p == pytest.approx(0.9) and config.repetition_penalty == pytest.approx(1.1)


def test_defaults():
    spec = parse_generate_request(_request(), LIMITS)
    config = to_sampling_config(spec.sampling, resolve_max_tokens(spec, 3, LIMITS))
    assert (config.temperature, config.top_p, config.repetition_penalty, config.max_tokens) == (1.0, 1.0, 1.0, 16)
    assert not config.HasField("seed") and not config.HasField("logprobs") and not config.HasField("prompt_logprobs")
    assert spec.skip_special_tokens is True and spec.request_id == ""


def test_chat_messages_with_empty_content_are_allowed():
    spec = parse_generate_request(_request(text=None, messages=[Msg(role="system", content=""),
                                                                Msg(role="user", content="hi")],
                                           add_generation_prompt=False), LIMITS)
    assert spec.prompt.messages[0] == {"role": "system", "content": ""}
    assert spec.prompt.add_generation_prompt is False
