"""The HTTP API's errors: OpenAI-style JSON with the status the case calls for, and a router that
survives whatever a client sends."""

import asyncio

import pytest

from tests.router.harness import running_router
from tests.router.http_helpers import call, fake, run, stream

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, body, the field the 400 must name)
BAD_FIELDS = [
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, "top_k"),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, "n"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1000}, "max_tokens"),  # beyond the fake's 256 positions
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2**40}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    (COMPLETIONS, {"prompt": "hi", "seed": -1}, "seed"),
    (COMPLETIONS, {"prompt": "hi", "stop": 3}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["ok", ""]}, "stop[1]"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": ["a"]}, "stop_token_ids[0]"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [5000]}, "stop_token_ids[0]"),
    (COMPLETIONS, {"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos"),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "hi", "min_p": 1.5}, "min_p"),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "!"}, "suffix"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias"),
    (COMPLETIONS, {"max_tokens": 3}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [1, 99999]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": [[1], [2, 99999]]}, "prompt[1][1]"),
    (COMPLETIONS, {"prompt": ["a", [1]]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": ["a", ""]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": [[1], []]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": [1] * 300}, "prompt"),  # longer than the model
    (COMPLETIONS, {"prompt": {"text": "hi"}}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": ["hi"]}, "messages[0]"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": 5000}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "n": 3}, "n"),
    ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
    ("/detokenize", {"tokens": [1, 5000]}, "tokens[1]"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
]


def test_bad_fields_get_400_naming_the_field_and_the_router_keeps_serving(model_dir):
    async def scenario():
        worker = await fake()
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            replies = [await call(router.http_url, path, payload) for path, payload, _ in BAD_FIELDS]
            raw = [await call(router.http_url, COMPLETIONS, data=data) for data in
                   (b"{bad json", b"[1, 2]", b"\xff\xfe", b"", b'{"prompt": "hi", "temperature": NaN}')]
            streamed = await stream(router.http_url, COMPLETIONS, {"prompt": "hi", "stream": True, "top_p": 2})
            long_id = await call(router.http_url, COMPLETIONS, {"prompt": "hi"}, headers={"X-Request-Id": "x" * 200})
            unknown_model = await call(router.http_url, COMPLETIONS, {"prompt": "hi", "model": "gpt-4"})
            not_found = await call(router.http_url, "/v1/nothing", {})
            wrong_method = await call(router.http_url, COMPLETIONS, method="GET")
            still = await call(router.http_url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "model": "tiny-x"})
            too_many = await call(router.http_url, COMPLETIONS, {"prompt": [[1]] * 1281})  # 256 in flight + 1024 queued
        await worker.stop()
        return replies, raw, streamed, long_id, unknown_model, not_found, wrong_method, still, too_many, worker.engine

    replies, raw, streamed, long_id, unknown_model, not_found, wrong_method, still, too_many, engine = run(scenario())
    for (path, payload, field), (status, body, _) in zip(BAD_FIELDS, replies):
        assert status == 400, (path, payload, body)
        error = body["error"]
        assert error["param"] == field, (payload, error)
        assert error["message"].startswith(f"{field}: ") and error["type"] == "invalid_request_error"
    for status, body, _ in raw:
        assert status == 400 and body["error"]["param"] in ("body", "temperature"), body
    status, content_type, [body] = streamed
    assert status == 400 and "json" in content_type and body["error"]["param"] == "top_p"
    assert long_id[0] == 400 and long_id[1]["error"]["param"] == "X-Request-Id"
    assert unknown_model[0] == 404 and unknown_model[1]["error"]["code"] == "model_not_found"
    assert unknown_model[1]["error"]["param"] == "model"
    assert not_found[0] == 404 and not_found[1]["error"]["code"] == "not_found"
    assert wrong_method[0] == 405 and wrong_method[1]["error"]["code"] == "method_not_allowed"
    assert still[0] == 404  # "tiny-x" is not the served model's name
    assert too_many[0] == 400 and "at most 1280 prompts" in too_many[1]["error"]["message"]
    assert engine.adds == [], "no bad request reached the worker"


@pytest.fixture(scope="module")
def served_name(model_dir):
    return model_dir.resolve().name


def test_api_key_401_queue_full_429_no_worker_503(model_dir, served_name):
    async def scenario():
        worker = await fake(step_interval_s=0.05)
        key = {"Authorization": "Bearer s3cret"}
        async with running_router(model_dir, [worker.address], http_port=0, api_key="s3cret", max_in_flight=1,
                                  max_queue=0) as router:
            url = router.http_url
            missing = await call(url, COMPLETIONS, {"prompt": "hi"})
            wrong = await call(url, "/v1/models", method="GET", headers={"Authorization": "Bearer nope"})
            health = await call(url, "/health", method="GET")
            by_header = await call(url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "model": served_name},
                                   headers={"x-api-key": "s3cret"})
            holder = asyncio.create_task(call(url, COMPLETIONS, {"prompt": "hold", "max_tokens": 40}, headers=key))
            while router.path.admission.num_in_flight == 0:
                await asyncio.sleep(0.01)
            full = await call(url, COMPLETIONS, {"prompt": "hi"}, headers=key)
            full_stream = await stream(url, CHAT, {"messages": USER, "stream": True}, headers=key)
            held = await holder
        async with running_router(model_dir, ["127.0.0.1:1"], wait_ready=False, http_port=0) as router:
            no_worker = await call(router.http_url, COMPLETIONS, {"prompt": "hi"})
            no_health = await call(router.http_url, "/health", method="GET")
        await worker.stop()
        return missing, wrong, health, by_header, full, full_stream, held, no_worker, no_health

    missing, wrong, health, by_header, full, full_stream, held, no_worker, no_health = run(scenario())
    assert missing[0] == wrong[0] == 401
    assert missing[1]["error"]["type"] == "authentication_error" and "missing API key" in missing[1]["error"]["message"]
    assert wrong[1]["error"]["message"] == "wrong API key"
    assert health[0] == 200, "health needs no key"
    assert by_header[0] == 200 and by_header[1]["choices"][0]["finish_reason"] == "length"
    assert full[0] == 429 and full[1]["error"]["type"] == "rate_limit_error"
    status, _, [body] = full_stream
    assert status == 429 and body["error"]["code"] == "queue_full"
    assert held[0] == 200 and held[1]["usage"]["completion_tokens"] == 40
    assert no_worker[0] == no_health[0] == 503
    assert no_worker[1]["error"]["type"] == "service_unavailable" and "no worker" in no_worker[1]["error"]["message"]


def test_unexpected_errors_are_500_without_details_and_the_router_survives(model_dir):
    async def scenario():
        worker = await fake()
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            def broken_encode(text, add_special_tokens=True):
                raise RuntimeError("tokenizer bug")

            router.path.tokenizer.encode = broken_encode
            broken = await call(router.http_url, COMPLETIONS, {"prompt": "hi"}, headers={"X-Request-Id": "r-9"})
            del router.path.tokenizer.encode
            fine = await call(router.http_url, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
        await worker.stop()
        return broken, fine

    broken, fine = run(scenario())
    status, body, headers = broken
    assert status == 500 and body["error"]["type"] == "internal_error"
    assert "r-9" in body["error"]["message"] and "tokenizer bug" not in body["error"]["message"]
    assert headers["X-Request-Id"] == "r-9"
    assert fine[0] == 200


ODD_VALUES = [None, True, False, 0, 1, -1, 2, 1.5, -0.0, 1e300, 2**70, "", "x", "hi", [], [1, 2], [[1]], ["a"],
              {}, {"a": 1}, [None], [1.5], [True], "\u0000", "𝔘"]
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "stop", "seed", "logprobs", "top_logprobs", "echo", "stream", "stream_options", "n", "ignore_eos",
          "repetition_penalty", "stop_token_ids", "min_tokens", "presence_penalty", "skip_special_tokens", "model",
          "add_generation_prompt", "response_format", "tools", "best_of", "logit_bias", "suffix", "tokens"]


def test_random_bodies_never_get_a_500(model_dir):
    import random

    rng = random.Random(13)
    paths = [COMPLETIONS, CHAT, "/tokenize", "/detokenize"]
    bodies = []
    for _ in range(160):
        body = {field: rng.choice(ODD_VALUES) for field in rng.sample(FIELDS, rng.randrange(1, 8))}
        if rng.random() < 0.5:
            body.setdefault("prompt", "hi")
            body["messages"] = USER if rng.random() < 0.5 else body.get("messages")
        bodies.append((rng.choice(paths), body))

    async def scenario():
        worker = await fake(tokens_per_step=16, step_interval_s=0.001)
        async with running_router(model_dir, [worker.address], http_port=0, max_request_bytes=8192) as router:
            too_large = await call(router.http_url, COMPLETIONS, {"prompt": "x" * 9000})
            replies = []
            for path, payload in bodies:
                if payload.get("stream") is True:
                    replies.append(await stream(router.http_url, path, payload))
                else:
                    replies.append(await call(router.http_url, path, payload))
            healthy = await call(router.http_url, "/health", method="GET")
        await worker.stop()
        return too_large, replies, healthy

    too_large, replies, healthy = run(scenario(), timeout=120)
    assert too_large[0] == 413 and too_large[1]["error"]["code"] == "request_too_large"
    statuses = [reply[0] for reply in replies]
    assert set(statuses) <= {200, 400, 404}, [(b, r) for b, r in zip(bodies, replies) if r[0] not in (200, 400, 404)]
    assert statuses.count(200) >= 5 and statuses.count(400) >= 100  # both paths exercised (seeded)
    for (path, payload), reply in zip(bodies, replies):
        if reply[0] == 200 and path in (COMPLETIONS, CHAT) and payload.get("stream") is True:
            assert all("error" not in event for event in reply[2][:-1]), (payload, reply)
    assert healthy[0] == 200
