"""MTP speculative decoding: greedy output is unchanged for any k, acceptance is accounted exactly,
and sampled output keeps the target distribution."""

import pytest
from scipy.stats import chi2_contingency

from tests.engine_helpers import assert_pool_full, count_forward_passes, greedy, make_llm, make_prompts
from worker import SamplingParams
from worker.engine.proposer import ScriptedProposer

PROMPT_LENGTHS = [1, 4, 17, 33, 80, 150, 230, 300]
MAX_TOKENS = 48
MAX_K = 4


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(PROMPT_LENGTHS, seed=2)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """Greedy continuations without speculation, long enough to script drafts past MAX_TOKENS."""
    llm = make_llm(model_dir)
    return [o.token_ids for o in llm.generate(prompts, greedy(MAX_TOKENS + 2 * MAX_K + 2))]


def oracle_script(prompts, reference, wrong_at=()):
    """Drafts the true continuation, except at the draft positions listed in wrong_at."""
    continuation = {tuple(p): r for p, r in zip(prompts, reference)}

    def script(request_id, tokens, k):
        for prompt, ref in continuation.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                drafts = list(ref[done : done + k])
                return [(t + 1) % 1000 if j in wrong_at else t for j, t in enumerate(drafts)]
        raise AssertionError("unknown request")

    return script


@pytest.mark.parametrize("k", range(1, MAX_K + 1), ids=lambda k: f"k{k}")
def test_mtp_greedy_identical_to_no_speculation(model_dir, prompts, reference, k):
    llm = make_llm(model_dir, speculative_tokens=k, max_num_batched_tokens=96)
    outputs = llm.generate(prompts, greedy(MAX_TOKENS))
    assert [o.token_ids for o in outputs] == [r[:MAX_TOKENS] for r in reference]
    for out in outputs:
        assert out.num_drafted_tokens > 0 and out.num_drafted_tokens % k == 0
        assert 0 <= out.num_accepted_tokens <= out.num_drafted_tokens
    assert_pool_full(llm)


SCRIPTS = {
    "accept-all": (),
    "reject-first": (0,),
    "reject-middle": (1,),
}


@pytest.mark.parametrize("k", [1, 2, 4], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("script", list(SCRIPTS), ids=list(SCRIPTS))
def test_scripted_drafts(model_dir, prompts, reference, k, script):
    wrong_at = SCRIPTS[script]
    proposer = ScriptedProposer(oracle_script(prompts, reference, wrong_at), k)
    llm = make_llm(model_dir, speculative_tokens=k, proposer=proposer, max_num_batched_tokens=4096)
    outputs = llm.generate(prompts, greedy(MAX_TOKENS))
    assert [o.token_ids for o in outputs] == [r[:MAX_TOKENS] for r in reference]
    accepted_per_step = min([j for j in wrong_at if j < k], default=k)
    for out in outputs:
        steps = out.num_drafted_tokens // k
        assert out.num_accepted_tokens == accepted_per_step * steps
        assert out.mean_accepted_length == pytest.approx(accepted_per_step + 1)
        expected_rates = [1.0] * accepted_per_step + [0.0] * (k - accepted_per_step)
        assert out.acceptance_rate_per_position == pytest.approx(expected_rates)
    assert_pool_full(llm)


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"k{k}")
def test_always_right_drafts_cut_forward_passes(model_dir, prompts, reference, k):
    """One prompt alone: 1 prefill pass, then each verify pass emits k+1 tokens."""
    proposer = ScriptedProposer(oracle_script(prompts, reference), k)
    llm = make_llm(model_dir, speculative_tokens=k, proposer=proposer)
    passes = count_forward_passes(llm)
    out = llm.generate(prompts[3:4], greedy(MAX_TOKENS))[0]
    assert out.token_ids == reference[3][:MAX_TOKENS]
    assert out.num_accepted_tokens == out.num_drafted_tokens
    assert passes[0] == 1 + -(-(MAX_TOKENS - 1) // (k + 1))


@pytest.mark.parametrize("k", [0, 2], ids=lambda k: f"k{k}")
def test_seeded_sampling_same_alone_and_batched(model_dir, prompts, k):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    others = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.7, top_k=5, seed=7, ignore_eos=True),
              greedy(16)]
    llm = make_llm(model_dir, speculative_tokens=k)
    alone = llm.generate([prompts[2]], params)[0].token_ids
    batch = llm.generate([prompts[0], prompts[1], prompts[2], prompts[4]], [others[0], others[1], params, others[2]])
    assert batch[2].token_ids == alone
    assert_pool_full(llm)


def _sample_two_tokens(llm, prompt, num_samples):
    params = [SamplingParams(max_tokens=2, temperature=1.0, top_k=4, seed=s, ignore_eos=True)
              for s in range(num_samples)]
    return llm.generate([prompt] * num_samples, params, use_tqdm=False)


def test_rejection_sampling_keeps_the_distribution(model_dir, prompts):
    """The second token is sampled by verification when k=1: the joint distribution of the first
    two tokens (top_k=4 keeps the support tiny) must match the one without speculation."""
    prompt, num_samples = prompts[1], 2000
    plain = make_llm(model_dir, max_num_seqs=256, max_num_batched_tokens=4096)
    baseline = [tuple(o.token_ids) for o in _sample_two_tokens(plain, prompt, num_samples)]
    # Draft the most likely second token given the first, so both accept and reject paths are taken.
    likely = {}
    for first, second in baseline:
        likely.setdefault(first, {}).setdefault(second, 0)
        likely[first][second] += 1
    best = {first: max(counts, key=counts.get) for first, counts in likely.items()}
    proposer = ScriptedProposer(lambda rid, tokens, k: [best.get(tokens[-1], 0)], 1)
    spec = make_llm(model_dir, speculative_tokens=1, proposer=proposer, max_num_seqs=256, max_num_batched_tokens=4096)
    outputs = _sample_two_tokens(spec, prompt, num_samples)
    speculative = [tuple(o.token_ids) for o in outputs]
    num_accepted = sum(o.num_accepted_tokens for o in outputs)
    assert sum(o.num_drafted_tokens for o in outputs) == num_samples
    assert 0.2 * num_samples < num_accepted < 0.95 * num_samples, "both verify paths must be exercised"
    bins = sorted(set(baseline) | set(speculative))
    table = [[baseline.count(b) for b in bins], [speculative.count(b) for b in bins]]
    _, p_value, _, _ = chi2_contingency(table)
    assert p_value > 1e-3, (bins, table)
    assert_pool_full(spec)


def test_mtp_with_preemption_and_chunked_prefill(model_dir, prompts, reference):
    llm = make_llm(model_dir, speculative_tokens=2, num_kv_blocks=30, max_num_batched_tokens=64)
    outputs = llm.generate(prompts, greedy(MAX_TOKENS))
    assert [o.token_ids for o in outputs] == [r[:MAX_TOKENS] for r in reference]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_full(llm)


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"k{k}")
def test_chunk_leaving_only_the_last_prompt_token(model_dir, prompts, reference, k):
    """17 tokens in chunks of 16: the second chunk is the last prompt token alone, which must still
    draft (a decode without drafts is refused)."""
    assert len(prompts[2]) == 17
    llm = make_llm(model_dir, speculative_tokens=k, max_num_batched_tokens=16)
    out = llm.generate(prompts[2:3], greedy(MAX_TOKENS))[0]
    assert out.token_ids == reference[2][:MAX_TOKENS]
    assert out.num_drafted_tokens > 0
    assert_pool_full(llm)
