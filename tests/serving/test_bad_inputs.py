"""Bad requests get a status code and a message naming the field; the server keeps serving."""

import math

import grpc
import pytest

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.serving.conftest import free_port

R = generation_pb2.GenerateRequest
M = generation_pb2.ChatMessage
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_LEN = 4096  # the built-in model's max_position_embeddings

BAD_INPUTS = [
    ("empty-prompt", R(max_tokens=4), INVALID, "prompt"),
    ("empty-text", R(text="", max_tokens=4), INVALID, "prompt"),
    ("text-and-token-ids", R(text="hi", token_ids=[1, 2], max_tokens=4), INVALID, "token_ids"),
    ("text-and-messages", R(text="hi", messages=[M(role="user", content="x")], max_tokens=4), INVALID, "messages"),
    ("token-id-past-vocab", R(token_ids=[1, 5000], max_tokens=4), INVALID, "token_ids"),
    ("negative-token-id", R(token_ids=[-1], max_tokens=4), INVALID, "token_ids"),
    ("unknown-chat-role", R(messages=[M(role="wizard", content="x")], max_tokens=4), INVALID, "role"),
    ("negative-temperature", R(text="hi", temperature=-0.5), INVALID, "temperature"),
    ("nan-temperature", R(text="hi", temperature=math.nan), INVALID, "temperature"),
    ("infinite-temperature", R(text="hi", temperature=math.inf), INVALID, "temperature"),
    ("top-p-zero", R(text="hi", top_p=0.0), INVALID, "top_p"),
    ("top-p-above-one", R(text="hi", top_p=1.5), INVALID, "top_p"),
    ("top-k-below-minus-one", R(text="hi", top_k=-2), INVALID, "top_k"),
    ("min-p-above-one", R(text="hi", min_p=1.5), INVALID, "min_p"),
    ("repetition-penalty-zero", R(text="hi", repetition_penalty=0.0), INVALID, "repetition_penalty"),
    ("presence-penalty-too-big", R(text="hi", presence_penalty=3.0), INVALID, "presence_penalty"),
    ("frequency-penalty-too-small", R(text="hi", frequency_penalty=-2.5), INVALID, "frequency_penalty"),
    ("max-tokens-zero", R(text="hi", max_tokens=0), INVALID, "max_tokens"),
    ("max-tokens-negative", R(text="hi", max_tokens=-3), INVALID, "max_tokens"),
    ("max-tokens-past-model-length", R(text="hi", max_tokens=MAX_LEN + 10), INVALID, "max_tokens"),
    ("prompt-longer-than-model", R(token_ids=[1] * (MAX_LEN + 1), max_tokens=1), INVALID, "prompt"),
    ("too-many-stop-strings", R(text="hi", stop=[f"s{i}" for i in range(40)]), INVALID, "stop"),
    ("stop-string-too-long", R(text="hi", stop=["x" * 5000]), INVALID, "stop"),
    ("empty-stop-string", R(text="hi", stop=[""]), INVALID, "stop"),
    ("stop-token-id-past-vocab", R(text="hi", stop_token_ids=[10**6]), INVALID, "stop_token_ids"),
    ("logprobs-too-many", R(text="hi", logprobs=50), INVALID, "logprobs"),
    ("logprobs-negative", R(text="hi", logprobs=-1), INVALID, "logprobs"),
    ("min-tokens-above-max-tokens", R(text="hi", max_tokens=4, min_tokens=10), INVALID, "min_tokens"),
    ("request-id-too-long", R(text="hi", request_id="r" * 500), INVALID, "request_id"),
    ("oversized-request", R(text="x" * (20 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


@pytest.fixture(scope="module")
def router_port(tmp_path_factory, model_dir):
    from tests.serving.conftest import Process

    logs = tmp_path_factory.mktemp("bad-inputs")
    worker_port, port = free_port(), free_port()
    worker = Process(["worker", "--model", str(model_dir), "--port", str(worker_port), "--cache-memory-mb", "64"],
                     logs / "worker.log")
    router = None
    try:
        worker.wait_serving(f"127.0.0.1:{worker_port}")
        router = Process(["router", "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir),
                          "--worker", f"127.0.0.1:{worker_port}"], logs / "router.log")
        router.wait_serving(f"127.0.0.1:{port}")
        yield port
    finally:
        if router:
            router.stop()
        worker.stop()


@pytest.fixture(scope="module")
def stub(router_port):
    with grpc.insecure_channel(f"127.0.0.1:{router_port}") as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def test_the_table_is_big_enough():
    assert len(BAD_INPUTS) >= 25


@pytest.mark.parametrize("request_, code, field", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_and_named(stub, request_, code, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=30))
    assert err.value.code() == code, err.value.details()
    assert field.lower() in (err.value.details() or "").lower()
    good = list(stub.Generate(R(token_ids=[1, 2], max_tokens=2, temperature=0.0, ignore_eos=True), timeout=30))
    assert sum(len(c.token_ids) for c in good) == 2


def test_tokenize_refuses_an_unknown_role(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(generation_pb2.TokenizeRequest(messages=[M(role="robot", content="x")]))
    assert err.value.code() == INVALID and "role" in err.value.details()
