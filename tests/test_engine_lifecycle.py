"""Requests end the right way (stop tokens, eos, length, model length, abort) and give back the cache."""

import math

import pytest
import torch

from tests.engine_helpers import assert_pool_full, greedy, make_llm, make_prompts
from tests.near_ties import RoutingWatch, assert_no_near_tie, greedy_near_ties
from worker import SamplingParams
from worker.engine.sampling_params import SamplingParams as Params


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, speculative_tokens=2)


@pytest.fixture(scope="module")
def prompt():
    return make_prompts([12], seed=5)[0]


@pytest.fixture(scope="module")
def continuation(llm, prompt):
    return llm.generate([prompt], greedy(20))[0].token_ids


def test_stop_token_ids_end_the_request(llm, prompt, continuation):
    stop = continuation[5]
    first = continuation.index(stop)
    out = llm.generate([prompt], greedy(20, stop_token_ids=[stop]))[0]
    assert out.token_ids == continuation[: first + 1]
    assert out.finish_reason == "stop"
    assert_pool_full(llm)


def test_eos_from_generation_config_ends_the_request_unless_ignored(llm, prompt, continuation):
    eos = continuation[7]
    first = continuation.index(eos)
    saved = llm.engine.scheduler.config.eos_token_ids
    llm.engine.scheduler.config.eos_token_ids = [eos]
    try:
        stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
        ignored = llm.generate([prompt], greedy(20))[0]
    finally:
        llm.engine.scheduler.config.eos_token_ids = saved
    assert stopped.token_ids == continuation[: first + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == continuation and ignored.finish_reason == "length"
    assert_pool_full(llm)


def test_max_model_len_ends_the_request(model_dir, prompt):
    llm = make_llm(model_dir, max_model_len=20, speculative_tokens=1)
    out = llm.generate([prompt], greedy(64))[0]
    assert len(prompt) + len(out.token_ids) == 20
    assert out.finish_reason == "length"
    with pytest.raises(ValueError, match="maximum length"):
        llm.generate([[1] * 20], greedy(4))
    assert_pool_full(llm)


def test_abort_at_step_boundary_frees_everything(llm, prompt):
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"abort-{i}", prompt, greedy(40))
    for _ in range(3):
        engine.step()
    assert engine.abort("abort-1")
    assert not engine.abort("no-such-request")
    finished = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["abort-1"].finish_reason == "abort"
    assert 0 < len(finished["abort-1"].token_ids) < 40
    assert finished["abort-0"].finish_reason == finished["abort-2"].finish_reason == "length"
    assert_pool_full(llm)


def test_abort_of_a_waiting_request(llm, prompt):
    engine = llm.engine
    engine.add_request("waiting", prompt, greedy(8))
    engine.abort("waiting")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason, o.token_ids) for o in outputs] == [("waiting", "abort", [])]
    engine.step()
    assert_pool_full(llm)


def test_logprobs_are_the_models_log_softmax(model_dir, llm, prompt, continuation):
    from transformers import AutoModelForCausalLM

    out = llm.generate([prompt], greedy(6, logprobs=3))[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad(), RoutingWatch(hf) as watch:
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    assert_no_near_tie(watch.near_ties(), "HF routing")
    assert_no_near_tie(greedy_near_ties(logits, depth=3), "HF's top-3 order")
    expected = logits.log_softmax(-1)
    assert len(out.logprobs) == 6
    for i, (token, (logprob, top)) in enumerate(zip(out.token_ids, out.logprobs)):
        assert math.isclose(logprob, expected[i, token].item(), abs_tol=1e-4)
        assert [t for t, _ in top] == expected[i].topk(3).indices.tolist()
        assert top[0][0] == token  # greedy: the sampled token is the most likely one


def test_string_prompts_use_the_folder_tokenizer(llm):
    tokenizer = llm.tokenizer
    text = "Hello, world — ça va? 你好"
    out = llm.generate([text], greedy(4))[0]
    assert out.prompt_token_ids == tokenizer.encode(text)


def test_bad_requests_are_refused_with_the_field_named(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**6]], greedy(4))
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], greedy(4))
    with pytest.raises(ValueError, match="temperature"):
        Params(temperature=-1.0)
    assert_pool_full(llm)
