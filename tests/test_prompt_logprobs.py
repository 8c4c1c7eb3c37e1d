"""Prompt logprobs equal transformers' log-softmax over its own logits, whatever the chunking,
batching, preemption or speculative setup; each prompt token is scored exactly once."""

import pytest
import torch

from tests.engine_helpers import assert_pool_full, greedy, make_llm, make_prompts
from tests.helpers import hf_logits, load_hf
from worker.engine.plan import NewRequest, ScheduledSequence, StepPlan
from worker.engine.prompt_logprobs import PromptLogprobs
from worker.engine.sampling_params import SamplingParams

PROMPT_LENGTHS = [1, 2, 17, 70, 300]
NUM_TOP = 3
TOLERANCE = 1e-4  # fp32 on both sides


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(PROMPT_LENGTHS, seed=3)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """transformers' [P, V] log-softmax per prompt (row p scores token p + 1)."""
    hf = load_hf(model_dir)
    return [torch.log_softmax(hf_logits(hf, prompt).float(), dim=-1) for prompt in prompts]


def assert_matches_reference(prompt, prompt_logprobs, reference, num_top=NUM_TOP):
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for position, (logprob, top) in enumerate(prompt_logprobs[1:], start=1):
        expected = reference[position - 1]
        assert abs(logprob - expected[prompt[position]].item()) < TOLERANCE, position
        assert len(top) == num_top
        # Ids are compared through the reference's values, which is robust to near-ties in the ranking.
        best = expected.topk(num_top).values
        for (token_id, value), ref_value in zip(top, best):
            assert abs(value - ref_value.item()) < TOLERANCE and abs(expected[token_id].item() - value) < TOLERANCE


ENGINE_SETUPS = {
    "one-step-prefill": dict(max_num_batched_tokens=4096),
    "chunked-prefill": dict(max_num_batched_tokens=48),
    "preemption": dict(num_kv_blocks=30, max_num_batched_tokens=64),
    "mtp-k2-chunked": dict(speculative_tokens=2, max_num_batched_tokens=40),
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS), ids=list(ENGINE_SETUPS))
def test_prompt_logprobs_equal_transformers(model_dir, prompts, reference, setup):
    llm = make_llm(model_dir, **ENGINE_SETUPS[setup])
    outputs = llm.generate(prompts, greedy(24, prompt_logprobs=NUM_TOP))
    for prompt, out, ref in zip(prompts, outputs, reference):
        assert_matches_reference(prompt, out.prompt_logprobs, ref)
        assert len(out.token_ids) == 24
    if setup == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_full(llm)
    assert llm.engine.runner.prompt_logprobs.num_tracked == 0


def test_only_requests_that_ask_get_them_with_their_own_top_n(model_dir, prompts, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=4096)
    params = [greedy(4), greedy(4, prompt_logprobs=0), greedy(4, prompt_logprobs=5, logprobs=2), greedy(4)]
    outputs = llm.generate(prompts[1:], params)
    assert outputs[0].prompt_logprobs is None and outputs[3].prompt_logprobs is None
    assert_matches_reference(prompts[2], outputs[1].prompt_logprobs, reference[2], num_top=0)
    assert_matches_reference(prompts[3], outputs[2].prompt_logprobs, reference[3], num_top=5)
    assert len(outputs[2].logprobs) == 4 and outputs[1].logprobs is None
    assert_pool_full(llm)


def _fake_logits(hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a 7-token vocabulary that differ row by row (hidden holds the row's position + 1)."""
    return hidden[:, :1] * torch.arange(7.0) / 10


def _chunk(request_id, prompt, start, end):
    return ScheduledSequence(request_id, prompt[start:end], start, [], 0, 1, is_decode=False,
                             sample=end == len(prompt))


def test_chunks_and_a_recompute_score_each_prompt_token_once_in_rows_of_the_chunk_size():
    scorer = PromptLogprobs(rows_per_chunk=4)
    prompt = [1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    calls = []

    def logits(hidden):
        calls.append(hidden.shape[0])
        return _fake_logits(hidden)

    def run(plan):
        scorer.track(plan)
        hidden = torch.cat([torch.arange(s.start_position, s.start_position + len(s.token_ids)).float()[:, None] + 1
                            for s in plan.sequences])
        return scorer.compute(plan, hidden, logits).to_host()

    new = [NewRequest("a", prompt, SamplingParams(prompt_logprobs=1))]
    first = run(StepPlan(1, [_chunk("a", prompt, 0, 6)], new))
    assert calls == [4, 2]  # six rows in chunks of at most four
    assert [len(entries) for entries in first.values()] == [6]  # tokens 1..6, the last from the next chunk
    again = run(StepPlan(2, [_chunk("a", prompt, 0, 8)]))  # preempted: recomputed from the start
    rest = run(StepPlan(3, [_chunk("a", prompt, 8, 10)]))
    scored = first[0] + again[0] + rest[0]
    assert len(scored) == len(prompt) - 1
    for position, (logprob, top) in enumerate(scored):
        expected = torch.log_softmax(_fake_logits(torch.tensor([[position + 1.0]])), dim=-1)[0]
        assert logprob == pytest.approx(expected[prompt[position + 1]].item(), abs=1e-6)
        assert top == [(6, pytest.approx(expected[6].item(), abs=1e-6))]
    scorer.track(StepPlan(4, [], finished_request_ids=["a"]))
    assert scorer.num_tracked == 0
