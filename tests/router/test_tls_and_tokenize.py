"""TLS serving, and the Tokenize RPC (which needs no worker)."""

import asyncio
import shutil
import subprocess

import grpc
import pytest

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from router.tokenizer import RouterTokenizer
from tests.router.harness import running_router


def test_tokenize_text_and_messages(model_dir):
    tokenizer = RouterTokenizer(model_dir)
    messages = [generation_pb2.ChatMessage(role="system", content="be brief"),
                generation_pb2.ChatMessage(role="user", content="世界?")]

    async def scenario():
        async with running_router(model_dir, ["127.0.0.1:1"], wait_ready=False) as router:
            text = await router.stub.Tokenize(generation_pb2.TokenizeRequest(text="Hello 世界"))
            chat = await router.stub.Tokenize(generation_pb2.TokenizeRequest(messages=messages,
                                                                             add_generation_prompt=False))
            errors = []
            for request in (generation_pb2.TokenizeRequest(),
                            generation_pb2.TokenizeRequest(messages=[generation_pb2.ChatMessage(role="bot")])):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await router.stub.Tokenize(request)
                errors.append(error.value)
            return text, chat, errors

    text, chat, errors = asyncio.run(scenario())
    assert list(text.token_ids) == tokenizer.encode("Hello 世界")
    assert list(text.tokens) == [tokenizer.token_text(token_id) for token_id in text.token_ids]
    rendered, ids = tokenizer.encode_chat([{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "世界?"}], add_generation_prompt=False)
    assert chat.rendered == rendered and list(chat.token_ids) == ids
    assert all(error.code() == grpc.StatusCode.INVALID_ARGUMENT for error in errors)
    assert "messages[0].role" in errors[1].details()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls(model_dir, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)

    async def scenario():
        async with running_router(model_dir, ["127.0.0.1:1"], wait_ready=False, tls_cert=str(cert),
                                  tls_key=str(key)) as router:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{router.port}", credentials) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                return await stub.Tokenize(generation_pb2.TokenizeRequest(text="hi"), timeout=5)

    assert len(asyncio.run(scenario()).token_ids) > 0
