"""The HTTP API end to end: the real `openai` client against `nextserve serve --http-port` on the
built-in tiny fp32 checkpoint, checked against transformers, plus plain HTTP for the SSE framing
and for disconnects, whose blocks and slots GetModelInfo must show freed."""

import http.client
import json
import socket
import time

import grpc
import openai
import pytest
import torch

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.engine_helpers import make_prompts
from tests.helpers import hf_logits, load_hf
from tests.router.http_helpers import parse_events
from tests.serving.conftest import free_port
from worker.tools.tiny_checkpoint import TINY_MODEL_NAME as MODEL

MIN_MARGIN = 1e-3  # the reference's top-1 / top-2 logit gap that makes a greedy comparison meaningful
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0]}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


def hf_greedy_with_margins(hf, prompt: list[int], num_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy tokens (a full forward per step) and the smallest top-1 / top-2 logit gap."""
    tokens, margin = [], float("inf")
    for _ in range(num_tokens):
        values, ids = hf_logits(hf, prompt + tokens)[-1].topk(2)
        margin = min(margin, (values[0] - values[1]).item())
        tokens.append(int(ids[0]))
    return tokens, margin


def error_of(e: openai.APIStatusError) -> dict:
    return e.body.get("error", e.body)


def test_greedy_completion_from_token_ids_equals_transformers(client, hf_model, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    candidates = make_prompts([23, 31, 47, 19, 40], seed=21)
    checked = 0
    for prompt in candidates:
        expected, margin = hf_greedy_with_margins(hf_model, prompt, NUM_TOKENS)
        if margin < MIN_MARGIN:
            continue  # a near-tie: either token would be right
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), NUM_TOKENS)
        checked += 1
    assert checked >= 3, "every candidate prompt had a near-tie in the reference"


def test_streamed_chat_concatenates_to_the_whole_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about lighthouses."}]
    args = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and len(streamed) > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_echo_logprobs_equal_transformers_including_chunked_prefill(client, hf_model):
    prompts = make_prompts([9, 150], seed=8)  # 150 tokens: three prefill chunks of 64
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                    temperature=0)
    for prompt, choice in zip(prompts, sorted(out.choices, key=lambda c: c.index)):
        reference = torch.log_softmax(hf_logits(hf_model, prompt).float(), dim=-1)
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(prompt) + 1
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        for position in range(1, len(prompt)):
            expected = reference[position - 1]
            assert abs(logprobs.token_logprobs[position] - expected[prompt[position]].item()) < 1e-3
            assert abs(max(logprobs.top_logprobs[position].values()) - expected.max().item()) < 1e-3
        generated = logprobs.token_logprobs[len(prompt)]
        assert abs(generated - reference[-1].max().item()) < 1e-3  # greedy: the likeliest token


def test_bad_fields_are_400_naming_the_field(client):
    cases = [(dict(prompt="hi", temperature=-0.5), "temperature"), (dict(prompt="hi", n=2), "n"),
             (dict(prompt="hi", logprobs=30), "logprobs"), (dict(prompt=[1, 10**6]), "prompt[1]"),
             (dict(prompt="hi", max_tokens=10**6), "max_tokens"),
             (dict(prompt="hi", extra_body={"min_p": 2}), "min_p")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, **fields)
        assert error_of(refused.value)["param"] == param, fields
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert error_of(refused.value)["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="hi")
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_raw_sse_framing(served):
    connection = http.client.HTTPConnection("127.0.0.1", served[0], timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 5, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = parse_events(response.read())
    connection.close()
    assert len(events) == 6 and events[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def _load(grpc_port: int):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        return generation_pb2_grpc.GenerationStub(channel).GetModelInfo(generation_pb2.GetModelInfoRequest()).load


def _wait_load(grpc_port: int, predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not predicate(load := _load(grpc_port)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {load}"
        time.sleep(0.05)
    return load


def _post(port: int, payload: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_disconnect_frees_the_requests_blocks_and_slots(served, stream):
    http_port, grpc_port = served
    _wait_load(grpc_port, lambda load: load.running_requests == 0, "an idle server")
    sock = _post(http_port, {"prompt": list(range(40)), "max_tokens": 3000, "stream": stream, "ignore_eos": True})
    if stream:
        received = b""
        while b"data: {" not in received:  # the headers, then the first event
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    busy = _wait_load(grpc_port, lambda load: load.running_requests == 1, "the request to run")
    assert busy.free_kv_blocks < busy.total_kv_blocks and busy.free_gdn_slot_groups < busy.total_gdn_slot_groups
    sock.close()
    _wait_load(grpc_port, lambda load: (load.running_requests == load.waiting_requests == 0
                                        and load.free_kv_blocks == load.total_kv_blocks
                                        and load.free_gdn_slot_groups == load.total_gdn_slot_groups),
               "every block and slot back")


def _health(http_port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def test_health_is_503_while_the_worker_is_gone_and_200_once_it_is_back(spawn, model_dir):
    from tests.serving.conftest import start_router, start_worker

    worker_port, router_port, http_port = free_port(), free_port(), free_port()
    worker = start_worker(spawn, model_dir, worker_port)
    start_router(spawn, model_dir, router_port, [worker_port], "--http-port", str(http_port))
    assert _health(http_port) == 200
    worker.signal(9)
    deadline = time.monotonic() + 10
    while _health(http_port) != 503:
        assert time.monotonic() < deadline, "/health stayed 200 with the worker killed"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.InternalServerError) as unavailable:  # the SDK's class for 5xx
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert unavailable.value.status_code == 503
    start_worker(spawn, model_dir, worker_port)
    deadline = time.monotonic() + 30
    while _health(http_port) != 200:
        assert time.monotonic() < deadline, "/health did not return to 200 with the worker back"
        time.sleep(0.1)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_grpc_generate_returns_the_same_prompt_logprobs(client, served, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = make_prompts([70], seed=4)[0]
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=2, echo=True)
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(
            token_ids=prompt, max_tokens=1, prompt_logprobs=2), timeout=30))
    scored = responses[0].prompt_logprobs
    assert [entry.token_id for entry in scored] == prompt[1:]
    assert all(len(entry.top) == 2 for entry in scored)
    assert all(top.text == tokenizer.decode([top.token_id]) for entry in scored for top in entry.top)
    http_logprobs = echoed.choices[0].logprobs.token_logprobs[1:len(prompt)]
    assert max(abs(entry.logprob - value) for entry, value in zip(scored, http_logprobs)) < 1e-6
    assert all(not r.prompt_logprobs for r in responses[1:])
