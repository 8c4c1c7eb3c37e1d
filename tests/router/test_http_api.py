"""The HTTP API's shapes and behaviour against scripted fake workers: echo with prompt logprobs, SSE,
several prompts, stop strings, disconnects that abort, metrics and the shared request path."""

import asyncio
import json

import aiohttp
import pytest

from router.tokenizer import RouterTokenizer
from tests.router.harness import running_router, wait_until
from tests.router.http_helpers import call, fake, parse_events, run, stream

SCRIPT_TEXT = "Hello 世界 🎉 done. "


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return RouterTokenizer(model_dir)


@pytest.fixture(scope="module")
def script(tokenizer):
    return tokenizer.encode(SCRIPT_TEXT)


def test_echo_with_logprobs_puts_the_scored_prompt_first(model_dir, tokenizer, script):
    prompt = tokenizer.encode("count the stars")

    async def scenario():
        worker = await fake(script=script)
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            reply = await call(router.http_url, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 1,
                                                                     "echo": True, "temperature": 0})
        await worker.stop()
        return worker.engine.adds, reply

    [add], (status, body, _) = run(scenario())
    assert add.sampling.prompt_logprobs == 1 and add.sampling.logprobs == 1 and add.sampling.max_tokens == 1
    [choice] = body["choices"]
    assert choice["text"] == tokenizer.decode(prompt, skip_special_tokens=False) + tokenizer.decode(script[:1])
    logprobs = choice["logprobs"]
    n = len(prompt)
    assert logprobs["tokens"] == [tokenizer.token_text(t) for t in prompt + script[:1]]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:n] == [-0.25 * p for p in range(1, n)]  # the fake worker's scores
    assert logprobs["token_logprobs"][n] == -0.5
    for position in range(1, n):  # the chosen token and the top 1, the chosen first when it is the likelier
        top = logprobs["top_logprobs"][position]
        assert top == {tokenizer.token_text(prompt[position] + 1): -0.25 * position - 1,
                       tokenizer.token_text(prompt[position]): -0.25 * position}
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}


def test_streams_concatenate_to_the_whole_answer_with_usage_last(model_dir, tokenizer, script):
    request = {"prompt": "Say hi", "max_tokens": len(script), "stop": ["done"], "logprobs": 2}
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 7, "logprobs": True, "top_logprobs": 2}

    async def scenario():
        worker = await fake(script=script, tokens_per_step=2)
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            url = router.http_url
            whole = await call(url, "/v1/completions", request)
            streamed = await stream(url, "/v1/completions",
                                    {**request, "stream": True, "stream_options": {"include_usage": True}})
            chat_whole = await call(url, "/v1/chat/completions", chat)
            chat_streamed = await stream(url, "/v1/chat/completions", {**chat, "stream": True})
        await worker.stop()
        return worker.engine.adds, whole, streamed, chat_whole, chat_streamed

    adds, whole, streamed, chat_whole, chat_streamed = run(scenario())
    text = whole[1]["choices"][0]["text"]
    assert text == SCRIPT_TEXT[:SCRIPT_TEXT.index("done")]  # cut before the stop string
    assert whole[1]["choices"][0]["finish_reason"] == "stop" and whole[1]["choices"][0]["stop_reason"] == "done"
    status, content_type, events = streamed
    assert status == 200 and content_type.startswith("text/event-stream")
    chunks, usage_chunk = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == whole[1]["choices"][0]["logprobs"]["tokens"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole[1]["usage"]
    assert {c["id"] for c in events[:-1]} == {usage_chunk["id"]} and usage_chunk["object"] == "text_completion"

    assert adds[2].prompt_token_ids == adds[3].prompt_token_ids  # text parts joined, then the chat template
    message = chat_whole[1]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": SCRIPT_TEXT[:len(message["content"])]}
    chunks = chat_streamed[2][:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    logprobs = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert logprobs == chat_whole[1]["choices"][0]["logprobs"]["content"] and len(logprobs) == 7
    assert all(len(e["top_logprobs"]) == 2 and e["bytes"] == list(e["token"].encode()) for e in logprobs)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_a_list_of_prompts_gives_one_choice_each(model_dir, tokenizer):
    prompts = ["first prompt", "second 世界", "third"]

    async def scenario():
        worker = await fake(echo_prompt=True, tokens_per_step=3)
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            url = router.http_url
            whole = await call(url, "/v1/completions", {"prompt": prompts, "max_tokens": 6},
                               headers={"X-Request-Id": "batch-1"})
            ids = await call(url, "/v1/completions", {"prompt": [tokenizer.encode(p) for p in prompts], "max_tokens": 6})
            streamed = await stream(url, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "stream": True})
        await worker.stop()
        return worker.engine.adds, whole, ids, streamed

    adds, whole, ids, streamed = run(scenario())
    expected = [tokenizer.decode((tokenizer.encode(p) * 6)[:6]) for p in prompts]
    assert [c["text"] for c in whole[1]["choices"]] == expected
    assert [c["index"] for c in whole[1]["choices"]] == [0, 1, 2]
    assert [c["text"] for c in ids[1]["choices"]] == expected
    assert whole[1]["id"] == "cmpl-batch-1" and whole[2]["X-Request-Id"] == "batch-1"
    assert [a.request_id.split(".")[0] for a in adds[:3]] == ["batch-1-0", "batch-1-1", "batch-1-2"]
    texts = ["", "", ""]
    for event in streamed[2][:-1]:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == expected
    assert whole[1]["usage"]["completion_tokens"] == 18


async def _read_two_events_then_close(url: str, payload: dict) -> list[bytes]:
    """A client that reads the first two events of a stream and hangs up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(payload).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    events = []
    while len(events) < 2:
        size = int((await reader.readline()).strip(), 16)  # chunked transfer encoding
        events.append(await reader.readexactly(size))
        await reader.readline()
    writer.close()
    return [head, *events]


def test_a_client_that_disconnects_is_aborted_on_the_worker(model_dir):
    async def scenario():
        worker = await fake(step_interval_s=0.05)  # 200 tokens take 10 s: only an abort ends them sooner
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            url = router.http_url
            head, *events = await _read_two_events_then_close(url, {"prompt": "x", "max_tokens": 200, "stream": True})
            await wait_until(lambda: len(worker.engine.aborts) == 1, what="the stream's abort")
            await wait_until(lambda: router.path.admission.num_in_flight == 0, what="admission slot back")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
                with pytest.raises(asyncio.TimeoutError):  # a non-streamed request the client gives up on
                    await session.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 200})
            await wait_until(lambda: len(worker.engine.aborts) == 2, what="the non-streamed request's abort")
            await wait_until(lambda: router.path.admission.num_in_flight == 0, what="admission slot back")
            info = await router.model_info()
        await worker.stop()
        return head, events, info

    head, events, info = run(scenario())
    assert b"200 OK" in head and b"text/event-stream" in head
    assert all(e.startswith(b"data: {") and e.endswith(b"\n\n") for e in events)
    assert info.load.running_requests == 0 and info.load.free_kv_blocks == info.load.total_kv_blocks


def test_http_requests_are_counted_like_grpc_ones(model_dir):
    async def scenario():
        worker = await fake()
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            url = router.http_url
            await call(url, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3})
            await stream(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True,
                                                        "max_tokens": 4})
            await call(url, "/v1/completions", {"prompt": "a", "top_p": 7})
            await call(url, "/health", method="GET")
            await router.generate(text="grpc", max_tokens=2)
        await worker.stop()
        return router.metrics

    metrics = run(scenario())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples}

    def count(method, code):
        return samples.get(("nextserve_router_requests_total", (("code", code), ("method", method))), 0)

    assert count("/v1/completions", "OK") == 1 and count("/v1/completions", "INVALID_ARGUMENT") == 1
    assert count("/v1/chat/completions", "OK") == 1 and count("/health", "OK") == 1 and count("Generate", "OK") == 1
    assert samples[("nextserve_router_generation_tokens_total", ())] == 3 + 3 + 4 + 2
    assert samples[("nextserve_router_time_to_first_token_seconds_count", ())] == 4  # one per generation stream
    assert samples[("nextserve_router_request_duration_seconds_count", ())] == 3


def test_raw_sse_framing_over_plain_http(model_dir):
    async def scenario():
        worker = await fake(tokens_per_step=1)
        async with running_router(model_dir, [worker.address], http_port=0) as router:
            host, port = router.http_url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            data = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
            writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data.encode()))
            raw = await reader.read()  # HTTP/1.0: the body is everything until the server closes
            writer.close()
        await worker.stop()
        return raw

    raw = run(scenario())
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200") and b"Content-Type: text/event-stream" in head
    events = parse_events(body)
    assert len(events) == 1 + 3 + 1 + 1  # role, three tokens, finish, [DONE]
