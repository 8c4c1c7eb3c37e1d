"""The real router over real sockets, in front of scripted fake workers."""

import asyncio
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nextserve.v1 import common_pb2, generation_pb2
from router.tokenizer import RouterTokenizer
from tests.router.fake_worker import TOTAL_BLOCKS, TOTAL_SLOT_GROUPS, FakeEngine, FakeWorker
from tests.router.harness import NOT_SERVING, SERVING, health_is, running_router, wait_until

SCRIPT_TEXT = "Hello 世界 🎉 done. "


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return RouterTokenizer(model_dir)


@pytest.fixture(scope="module")
def script(tokenizer):
    return tokenizer.encode(SCRIPT_TEXT)


def run(coroutine):
    async def guarded():
        try:
            return await asyncio.wait_for(coroutine, 30)
        finally:
            await FakeWorker.stop_all()

    return asyncio.run(guarded())


async def _fake(**engine_args) -> FakeWorker:
    return await FakeWorker(FakeEngine(**engine_args)).start()


def _text(responses):
    return "".join(response.text for response in responses)


def test_streaming_chunks_text_and_final_message(model_dir, tokenizer, script):
    async def scenario():
        worker = await _fake(script=script, tokens_per_step=2)
        async with running_router(model_dir, [worker.address]) as router:
            responses = await router.generate(text="Say hi", max_tokens=9, request_id="client-7", seed=3)
        await worker.stop()
        return worker.engine, responses

    engine, responses = run(scenario())
    [add] = engine.adds
    assert list(add.prompt_token_ids) == tokenizer.encode("Say hi")
    assert add.sampling.max_tokens == 9 and add.sampling.seed == 3
    ids = [token for response in responses for token in response.token_ids]
    assert ids == (script * 2)[:9]
    assert all(len(response.token_ids) <= 2 for response in responses)  # one message per engine step
    assert _text(responses) == tokenizer.decode(ids)
    assert all(response.request_id == "client-7" for response in responses)
    *chunks, last = responses
    assert all(chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for chunk in chunks)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(add.prompt_token_ids), 9)
    assert last.speculative.drafted_tokens == 2 and last.speculative.mean_accepted_length == pytest.approx(1.5)


def test_chat_prompt_logprobs_and_generated_request_id(model_dir, tokenizer, script):
    messages = [generation_pb2.ChatMessage(role="user", content="你好")]

    async def scenario():
        worker = await _fake(script=script)
        async with running_router(model_dir, [worker.address]) as router:
            responses = await router.generate(messages=messages, max_tokens=4, logprobs=2)
        await worker.stop()
        return worker.engine, responses

    engine, responses = run(scenario())
    _, expected_prompt = tokenizer.encode_chat([{"role": "user", "content": "你好"}])
    assert list(engine.adds[0].prompt_token_ids) == expected_prompt
    assert len(responses[0].request_id) == 32 and len({r.request_id for r in responses}) == 1
    for response in responses:
        assert [lp.token_id for lp in response.logprobs] == list(response.token_ids)
        for logprob in response.logprobs:
            assert [top.text for top in logprob.top] == [tokenizer.token_text(top.token_id) for top in logprob.top]


def test_stop_string_cuts_text_and_aborts_on_the_worker(model_dir, tokenizer, script):
    async def scenario():
        worker = await _fake(script=script, tokens_per_step=3)
        async with running_router(model_dir, [worker.address]) as router:
            responses = await router.generate(text="x", max_tokens=50, stop=["界 🎉"])
            await wait_until(lambda: worker.engine.aborts, what="abort at the worker")
            info = await router.model_info()
        await worker.stop()
        return worker.engine, responses, info

    engine, responses, info = run(scenario())
    last = responses[-1]
    assert _text(responses) == "Hello 世"
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.matched_stop == "界 🎉"
    assert not last.HasField("matched_stop_token_id")
    assert engine.aborts == [engine.adds[0].request_id]
    assert info.load.free_kv_blocks == TOTAL_BLOCKS and info.load.running_requests == 0


def test_stop_token_reported(model_dir, script):
    async def scenario():
        worker = await _fake(script=script)
        async with running_router(model_dir, [worker.address]) as router:
            responses = await router.generate(text="x", max_tokens=50, stop_token_ids=[script[2]])
        await worker.stop()
        return responses

    last = run(scenario())[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.matched_stop_token_id == script[2]
    assert last.usage.completion_tokens == 3 and last.matched_stop == ""


def test_cancellation_aborts_and_frees_everything(model_dir):
    async def scenario():
        worker = await _fake(step_interval_s=0.02)
        async with running_router(model_dir, [worker.address]) as router:
            call = router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=200))
            await call.read()
            await call.read()
            busy = await router.model_info()
            call.cancel()
            await wait_until(lambda: worker.engine.aborts, what="abort at the worker")
            idle = await router.model_info()
        await worker.stop()
        return worker.engine, busy, idle

    engine, busy, idle = run(scenario())
    assert engine.aborts == [engine.adds[0].request_id]
    assert busy.router_in_flight == 1 and busy.load.running_requests == 1
    assert busy.load.free_kv_blocks == TOTAL_BLOCKS - 2
    assert idle.router_in_flight == 0 and idle.load.running_requests == 0
    assert idle.load.free_kv_blocks == TOTAL_BLOCKS and idle.load.free_gdn_slot_groups == TOTAL_SLOT_GROUPS


def test_deadline_exceeded_aborts(model_dir):
    async def scenario():
        worker = await _fake(step_interval_s=0.02)
        async with running_router(model_dir, [worker.address]) as router:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await router.generate(text="x", max_tokens=200, timeout=0.3)
            await wait_until(lambda: worker.engine.aborts, what="abort at the worker")
        await worker.stop()
        return error.value

    assert run(scenario()).code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_resource_exhausted_past_the_queue(model_dir):
    async def scenario():
        worker = await _fake(step_interval_s=0.02)
        async with running_router(model_dir, [worker.address], max_in_flight=1, max_queue=1) as router:
            running = router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=200))
            await running.read()
            queued = router.stub.Generate(generation_pb2.GenerateRequest(text="y", max_tokens=2))
            await wait_until(lambda: router.path.admission.num_waiting == 1, what="second request queued")
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await router.generate(text="z", max_tokens=2)
            refused_after = time.monotonic() - started
            running.cancel()
            queued_responses = [response async for response in queued]  # gets the slot and finishes
        await worker.stop()
        return error.value, refused_after, queued_responses

    error, refused_after, queued_responses = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.details()
    assert refused_after < 1.0
    assert queued_responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_worker_restart_fails_streams_fast_and_recovers(model_dir):
    async def scenario():
        worker = await _fake(step_interval_s=0.02)
        async with running_router(model_dir, [worker.address]) as router:
            assert await router.health() == SERVING
            assert await router.health("nextserve.v1.Generation") == SERVING
            watch = health_pb2_grpc.HealthStub(router.channel).Watch(health_pb2.HealthCheckRequest(service=""))
            watched = [(await watch.read()).status]
            call = router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=200))
            await call.read()
            await worker.stop()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                while await call.read() is not grpc.aio.EOF:
                    pass
            failed_after = time.monotonic() - started
            await wait_until(lambda: router.pool.num_ready == 0, what="worker unready")
            await wait_until(health_is(router, NOT_SERVING), what="health NOT_SERVING")
            unready_health = await router.health()
            watched.append((await watch.read()).status)
            with pytest.raises(grpc.aio.AioRpcError) as no_worker:
                await router.generate(text="x")
            restarted = await FakeWorker(FakeEngine(), port=worker.port).start()
            await wait_until(lambda: router.pool.num_ready == 1, what="worker ready again")
            await wait_until(health_is(router, SERVING), what="health SERVING again")
            await wait_until(health_is(router, SERVING, "nextserve.v1.Generation"), what="Generation SERVING")
            watched.append((await watch.read()).status)
            watch.cancel()
            responses = await router.generate(text="x", max_tokens=3)
        await restarted.stop()
        return error.value, failed_after, unready_health, no_worker.value, responses, watched

    error, failed_after, unready_health, no_worker, responses, watched = run(scenario())
    assert watched == [SERVING, NOT_SERVING, SERVING]  # health's Watch streams through the interceptors
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "retry" in error.details()
    assert failed_after < 2.0
    assert unready_health == NOT_SERVING
    assert no_worker.code() == grpc.StatusCode.UNAVAILABLE and "no worker group is ready" in no_worker.details()
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_least_loaded_worker_gets_new_requests(model_dir):
    async def scenario():
        workers = [await _fake(step_interval_s=0.02), await _fake(step_interval_s=0.02)]
        async with running_router(model_dir, [w.address for w in workers]) as router:
            calls = [router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=100)) for _ in range(4)]
            for call in calls:
                await call.read()
            counts = [len(w.engine.adds) for w in workers]
            info = await router.model_info()
            for call in calls:
                call.cancel()
        for worker in workers:
            await worker.stop()
        return counts, info

    counts, info = run(scenario())
    assert counts == [2, 2]
    assert info.ready_workers == 2 and info.load.running_requests == 4
    assert info.load.total_kv_blocks == 2 * TOTAL_BLOCKS


def test_api_key(model_dir):
    async def scenario():
        worker = await _fake()
        results = {}
        async with running_router(model_dir, [worker.address], api_key="s3cret") as router:
            for name, metadata in [("none", None), ("wrong", (("authorization", "Bearer nope"),)),
                                   ("bearer", (("authorization", "Bearer s3cret"),)),
                                   ("x-api-key", (("x-api-key", "s3cret"),))]:
                try:
                    await router.generate(metadata=metadata, text="x", max_tokens=2)
                    results[name] = "OK"
                except grpc.aio.AioRpcError as e:
                    results[name] = e.code().name
            try:
                await router.stub.GetModelInfo(generation_pb2.GetModelInfoRequest())
            except grpc.aio.AioRpcError as e:
                results["unary without key"] = e.code().name
            results["health without key"] = await router.health()
            results["reflection without key"] = await _list_services(router.channel)
        await worker.stop()
        return results

    results = run(scenario())
    assert results["none"] == results["wrong"] == results["unary without key"] == "UNAUTHENTICATED"
    assert results["bearer"] == results["x-api-key"] == "OK"
    assert results["health without key"] == SERVING
    assert "nextserve.v1.Generation" in results["reflection without key"]


async def _list_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    response = await call.read()
    return [service.name for service in response.list_services_response.service]


def test_reflection_lists_the_services(model_dir):
    async def scenario():
        async with running_router(model_dir, ["127.0.0.1:1"], wait_ready=False) as router:
            return await _list_services(router.channel)

    services = run(scenario())
    assert {"nextserve.v1.Generation", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def test_bad_requests_get_actionable_statuses(model_dir):
    async def scenario():
        worker = await _fake(step_interval_s=0.02)
        codes = {}
        async with running_router(model_dir, [worker.address], max_request_bytes=4096) as router:
            for name, fields in [("top_p", dict(text="x", top_p=2.0)),
                                 ("too long", dict(text="x", max_tokens=10_000)),
                                 ("huge", dict(text="x" * 10_000)),
                                 ("bad token", dict(token_ids=[5, 99999]))]:
                try:
                    await router.generate(**fields)
                except grpc.aio.AioRpcError as e:
                    codes[name] = (e.code(), e.details())
            running = router.stub.Generate(generation_pb2.GenerateRequest(text="x", max_tokens=100, request_id="dup"))
            await running.read()
            try:
                await router.generate(text="x", request_id="dup")
            except grpc.aio.AioRpcError as e:
                codes["duplicate"] = (e.code(), e.details())
            running.cancel()
            tokenized = await router.stub.Tokenize(generation_pb2.TokenizeRequest(text="Hello 世界"))
            assert await router.health() == SERVING  # nothing above hurt the router
        await worker.stop()
        return codes, tokenized

    codes, tokenized = run(scenario())
    assert codes["top_p"][0] == grpc.StatusCode.INVALID_ARGUMENT and codes["top_p"][1].startswith("top_p:")
    assert codes["too long"][0] == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in codes["too long"][1]
    assert codes["huge"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes["bad token"][0] == grpc.StatusCode.INVALID_ARGUMENT and "token_ids[1]" in codes["bad token"][1]
    assert codes["duplicate"][0] == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in codes["duplicate"][1]
    assert "".join(tokenized.tokens) == "Hello 世界" or len(tokenized.tokens) == len(tokenized.token_ids)


def test_no_worker_and_incompatible_worker(model_dir, caplog):
    async def scenario():
        small = await _fake(vocab_size=500)  # smaller than the tokenizer's 1003 tokens
        async with running_router(model_dir, [small.address], wait_ready=False) as router:
            await asyncio.sleep(0.5)
            ready = router.pool.num_ready
            health = await router.health()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await router.generate(text="x")
            with pytest.raises(grpc.aio.AioRpcError) as info_error:
                await router.model_info()
        await small.stop()
        return ready, health, error.value, info_error.value

    with caplog.at_level(logging.WARNING, logger="nextserve.router.workers"):
        ready, health, error, info_error = run(scenario())
    assert ready == 0 and health == NOT_SERVING
    assert error.code() == info_error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker group is ready" in error.details()
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "vocab_size 500" in refusals[0] and "--model" in refusals[0]


def test_worker_refusal_and_unexpected_errors_become_statuses(model_dir):
    async def scenario():
        refusing = await _fake(refuse_message="prompt uses a feature this engine lacks")
        async with running_router(model_dir, [refusing.address]) as router:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await router.generate(text="x", request_id="r-1")

            def broken_encode(text, add_special_tokens=True):
                raise RuntimeError("tokenizer bug")

            router.path.tokenizer.encode = broken_encode
            with pytest.raises(grpc.aio.AioRpcError) as internal:
                await router.generate(text="x", request_id="r-2")
            del router.path.tokenizer.encode
            with pytest.raises(grpc.aio.AioRpcError) as still_serving:  # the router survived both
                await router.generate(text="x")
        await refusing.stop()
        return refused.value, internal.value, still_serving.value

    refused, internal, still_serving = run(scenario())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == "prompt uses a feature this engine lacks"
    assert internal.code() == grpc.StatusCode.INTERNAL
    assert "r-2" in internal.details() and "router log" in internal.details() and "tokenizer bug" not in internal.details()
    assert still_serving.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_streams_each_get_their_own_tokens(model_dir, tokenizer):
    """40 streams over one worker connection, each echoing its own prompt: no cross-talk, all finish."""
    prompts = [f"prompt number {i} 世界" for i in range(40)]

    async def one(router, i):
        responses = await router.generate(text=prompts[i], max_tokens=12, request_id=f"req-{i}")
        return [token for response in responses for token in response.token_ids], responses[-1]

    async def scenario():
        worker = await _fake(echo_prompt=True, tokens_per_step=3, step_interval_s=0.005)
        async with running_router(model_dir, [worker.address], max_in_flight=16, max_queue=64) as router:
            results = await asyncio.gather(*(one(router, i) for i in range(40)))
            info = await router.model_info()
        await worker.stop()
        return results, info

    results, info = run(scenario())
    for i, (tokens, last) in enumerate(results):
        prompt = tokenizer.encode(prompts[i])
        assert tokens == (prompt * 12)[:12], i
        assert last.request_id == f"req-{i}" and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert info.router_in_flight == 0 and info.load.running_requests == 0
