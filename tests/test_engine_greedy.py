"""Greedy decoding through the engine equals transformers, whatever the batching, chunking or preemption."""

import pytest

from tests.engine_helpers import assert_equal_to_reference, assert_pool_full, greedy, hf_greedy, make_llm, make_prompts

PROMPT_LENGTHS = [1, 2, 3, 5, 9, 17, 30, 47, 64, 90, 120, 150, 190, 230, 270, 300]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def prompts():
    # Seed 37: transformers' greedy continuations hold no routing or greedy near-tie, so every token
    # is compared (seed 0 left 265 of the 1,024 after a near-tie).
    return make_prompts(PROMPT_LENGTHS, seed=37)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    return hf_greedy(model_dir, prompts, MAX_TOKENS)


ENGINE_SETUPS = {
    "one-step-prefill": dict(max_num_batched_tokens=4096),
    "chunked-prefill": dict(max_num_batched_tokens=48),
    "preemption": dict(num_kv_blocks=40, max_num_batched_tokens=512),
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS), ids=list(ENGINE_SETUPS))
def test_greedy_equals_transformers(model_dir, prompts, reference, setup):
    llm = make_llm(model_dir, **ENGINE_SETUPS[setup])
    outputs = llm.generate(prompts, greedy(MAX_TOKENS))
    assert_equal_to_reference(outputs, reference)
    assert all(out.finish_reason == "length" for out in outputs)
    if setup == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_full(llm)


def test_batch_invariance(model_dir):
    prompts = make_prompts([1 + (i * 37) % 200 for i in range(32)], seed=1)
    params = greedy(24)
    llm = make_llm(model_dir, max_num_batched_tokens=1024)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert batched == alone
    assert_pool_full(llm)
