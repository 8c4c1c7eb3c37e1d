"""Sampler and speculative-draft verification: params, filters, penalties, seeds, logprobs and
exact distributions (CPU, fixed seeds, so every statistical check is deterministic)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from worker.engine.sampler import (PAD_TOKEN_ID, RequestSampling, apply_penalties, sample,
                                   target_probs, verify_drafts)
from worker.engine.sampling_params import SamplingParams

NUM_DIST_SAMPLES = 6000
MIN_P_VALUE = 1e-3


def make_row(prompt=(), eos=(), **params) -> RequestSampling:
    return RequestSampling(SamplingParams(**params), prompt_token_ids=prompt, eos_token_ids=eos)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def peaked_logits(argmax_ids: list[int], vocab_size: int) -> torch.Tensor:
    """[len(argmax_ids), V] logits, small noise plus a clear peak at each listed id."""
    logits = torch.randn(len(argmax_ids), vocab_size, generator=generator(7))
    logits[torch.arange(len(argmax_ids)), torch.tensor(argmax_ids)] = 10.0
    return logits


def reference_probs(logits: torch.Tensor, temperature=1.0, top_p=1.0) -> np.ndarray:
    """Independent top-p reference: the smallest most-likely set whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[mass_before < top_p]] = True
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


def histogram(token_ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    return np.bincount(token_ids.numpy(), minlength=vocab_size)


def assert_follows(counts: np.ndarray, probs: np.ndarray):
    """Counts never hit zero-probability tokens and pass a chi-square test against probs."""
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * counts.sum()
    assert stats.chisquare(counts[support], expected).pvalue > MIN_P_VALUE


def assert_same_distribution(counts_a: np.ndarray, counts_b: np.ndarray):
    used = (counts_a + counts_b) > 0
    table = np.stack([counts_a[used], counts_b[used]])
    assert stats.chi2_contingency(table).pvalue > MIN_P_VALUE


# ---------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(seed=1.5), "seed"),
    (dict(seed="7"), "seed"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v))
def test_params_reject_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_defaults_and_greedy():
    params = SamplingParams()
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (16, 1.0, 0, 1.0)
    assert params.logprobs is None and params.seed is None and not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=-1, logprobs=20, seed=0).top_k == -1
    params.stop_token_ids.append(1)
    assert SamplingParams().stop_token_ids == []


# ---------------------------------------------------------------------------------------------
# Filters and greedy


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=generator(0))
    rows = [make_row(temperature=0, top_k=3, top_p=0.5, min_p=0.5) for _ in range(6)]
    result = sample(logits, rows)
    assert torch.equal(result.token_ids, logits.argmax(-1))
    assert result.logprobs is None and result.top_logprobs is None


FOUR_PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("params, expected_support", [
    (dict(top_k=2), [0, 1]),
    (dict(top_k=-1), [0, 1, 2, 3]),
    (dict(top_p=0.75), [0, 1]),
    (dict(top_p=0.85), [0, 1, 2]),
    (dict(top_p=0.4), [0]),
    (dict(min_p=0.2), [0, 1, 2]),
    (dict(min_p=0.5), [0, 1]),
    (dict(top_k=3, top_p=0.75), [0, 1]),
    (dict(top_k=3, min_p=0.05), [0, 1, 2]),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_filters_restrict_support(params, expected_support):
    logits = FOUR_PROBS.log()[None, [2, 0, 3, 1]]  # shuffled, so positions are not ranks
    vocab_order = [1, 3, 0, 2]  # rank r lives at vocab id vocab_order[r]
    support = sorted(vocab_order[r] for r in expected_support)
    probs = target_probs(logits, [make_row(**params)])[0]
    assert sorted(torch.nonzero(probs).flatten().tolist()) == support
    kept = logits[0].exp() * (probs > 0)
    torch.testing.assert_close(probs, kept / kept.sum())

    num_draws = 2000
    rows = [make_row(**params) for _ in range(num_draws)]
    drawn = sample(logits.expand(num_draws, -1), rows, default_generator=generator(1)).token_ids
    assert set(drawn.tolist()) == set(support)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_logits(temperature):
    logits = torch.randn(1, 20, generator=generator(2))
    probs = target_probs(logits, [make_row(temperature=temperature)])
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1))


# ---------------------------------------------------------------------------------------------
# Penalties and min_tokens


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    row = make_row(prompt=[0], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    row.append_output([1, 1, 3])
    # 0: prompt only -> 2/2; 1: output x2 -> -1*2 - 0.25*2 - 0.5; 3: output x1 -> -3*2 - 0.25 - 0.5
    expected = torch.tensor([[1.0, -3.0, 0.5, -6.75, 1.0]])
    torch.testing.assert_close(apply_penalties(logits, [row]), expected)
    # counts catch up incrementally; extra tokens count as outputs (token 4 once, token 1 once more)
    row.append_output([2])
    with_extra = apply_penalties(logits, [row], extra_tokens=[[4, 1]])
    expected = torch.tensor([[1.0, -2 - 0.75 - 0.5, 0.25 - 0.25 - 0.5, -6.75, 0.5 - 0.25 - 0.5]])
    torch.testing.assert_close(with_extra, expected)


def test_presence_and_frequency_ignore_prompt_and_spare_other_rows():
    logits = torch.zeros(2, 4)
    penalised = make_row(prompt=[0, 1], presence_penalty=1.0, frequency_penalty=0.5)
    penalised.append_output([2, 2])
    plain = make_row()
    plain.append_output([2])
    out = apply_penalties(logits, [penalised, plain])
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_min_tokens_masks_stop_and_eos_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # eos 1 first, stop 2 second
    row = make_row(eos=[1], temperature=0, min_tokens=2, stop_token_ids=[2])
    assert sample(logits, [row]).token_ids.item() == 3
    assert sample(logits, [row], extra_tokens=[[3]]).token_ids.item() == 3
    row.append_output([3])
    assert sample(logits, [row], extra_tokens=[[3]]).token_ids.item() == 1
    ignoring = make_row(eos=[1], temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(logits, [ignoring]).token_ids.item() == 1


# ---------------------------------------------------------------------------------------------
# Seeds


def seeded_tokens(params: dict, neighbours: list[dict], position: int, num_steps=5) -> list[int]:
    """Tokens of a seeded request over num_steps, batched at `position` among neighbours."""
    vocab_size = 30
    target = make_row(**params)
    rows = [make_row(**p) for p in neighbours]
    rows.insert(position, target)
    default = generator(99 + position)
    for step in range(num_steps):
        logits = torch.randn(len(rows), vocab_size, generator=generator(step))
        logits[position] = torch.randn(vocab_size, generator=generator(1000 + step))
        token_ids = sample(logits, rows, default_generator=default).token_ids
        for row, token_id in zip(rows, token_ids.tolist()):
            row.append_output([token_id])
    return target.output_token_ids


NEIGHBOURS = [dict(seed=5), dict(), dict(temperature=0), dict(top_k=4, temperature=0.7),
              dict(seed=8, top_p=0.5, repetition_penalty=1.3)]


@pytest.mark.parametrize("params", [dict(seed=42), dict(seed=42, top_p=0.9, presence_penalty=0.5)],
                         ids=["plain", "top_p-presence"])
def test_seed_gives_same_tokens_alone_and_in_batch(params):
    alone = seeded_tokens(params, [], 0)
    assert seeded_tokens(params, NEIGHBOURS, 0) == alone
    assert seeded_tokens(params, NEIGHBOURS, 3) == alone
    assert seeded_tokens(params, NEIGHBOURS[:2], 2) == alone
    assert seeded_tokens({**params, "seed": 43}, [], 0) != alone


def test_seeded_verify_same_alone_and_in_batch():
    vocab_size, num_query = 16, 3
    target_logits = torch.randn(1, num_query, vocab_size, generator=generator(3))
    drafts = torch.tensor([[4, 9]])

    def run(num_neighbours: int):
        rows = [make_row(seed=11)] + [make_row(seed=s) if s % 2 else make_row()
                                      for s in range(num_neighbours)]
        other_logits = torch.randn(num_neighbours, num_query, vocab_size, generator=generator(4))
        other_drafts = torch.randint(0, vocab_size, (num_neighbours, num_query - 1),
                                     generator=generator(5))
        outputs = []
        for _ in range(4):
            result = verify_drafts(torch.cat([target_logits, other_logits]),
                                   torch.cat([drafts, other_drafts]), rows,
                                   default_generator=generator(6))
            outputs.append(result.token_ids[0].tolist())
        return outputs

    assert run(0) == run(5)


def test_verify_with_one_query_row_matches_sample():
    logits = torch.randn(3, 1, 25, generator=generator(8))
    params = [dict(seed=1), dict(seed=2, top_k=5), dict(seed=3, temperature=0.6)]
    verified = verify_drafts(logits, torch.empty(3, 0, dtype=torch.long),
                             [make_row(**p) for p in params])
    sampled = sample(logits[:, 0], [make_row(**p) for p in params])
    assert verified.num_accepted.tolist() == [0, 0, 0]
    assert torch.equal(verified.token_ids[:, 0], sampled.token_ids)


# ---------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_raw_log_softmax_and_top_n_sorted():
    logits = torch.randn(3, 40, generator=generator(9))
    rows = [make_row(logprobs=0), make_row(logprobs=5, repetition_penalty=1.5, temperature=0),
            make_row(top_k=3)]
    rows[1].append_output([int(logits[1].argmax())])
    result = sample(logits, rows, default_generator=generator(10))
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(result.logprobs, raw.gather(1, result.token_ids[:, None])[:, 0])
    values, ids = result.top_logprobs
    assert values.shape == ids.shape == (3, 5)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    torch.testing.assert_close(values, raw.gather(1, ids))
    assert torch.equal(ids, raw.topk(5, -1).indices)


def test_logprobs_zero_top_n_returns_no_top():
    result = sample(torch.randn(2, 10), [make_row(logprobs=0), make_row()])
    assert result.logprobs.shape == (2,) and result.top_logprobs is None


# ---------------------------------------------------------------------------------------------
# verify_drafts, greedy


VOCAB = 12
ROW_ARGMAX = [3, 7, 5, 1]  # argmax of rows 0..3 of one sequence, Q = 4


@pytest.mark.parametrize("drafts, expected_tokens", [
    ([3, 7, 5], [3, 7, 5, 1]),
    ([4, 7, 5], [3, -1, -1, -1]),
    ([3, 7, 2], [3, 7, 5, -1]),
    ([3, 0, 5], [3, 7, -1, -1]),
], ids=["accept-all-bonus", "reject-first", "reject-last", "reject-middle"])
def test_verify_greedy(drafts, expected_tokens):
    logits = peaked_logits(ROW_ARGMAX, VOCAB)[None]
    result = verify_drafts(logits, torch.tensor([drafts]), [make_row(temperature=0, logprobs=2)])
    assert result.token_ids[0].tolist() == expected_tokens
    num_emitted = sum(t != PAD_TOKEN_ID for t in expected_tokens)
    assert result.num_accepted.tolist() == [num_emitted - 1]
    raw = torch.log_softmax(logits[0], -1)
    emitted = torch.tensor(expected_tokens[:num_emitted])
    torch.testing.assert_close(result.logprobs[0, :num_emitted],
                               raw[torch.arange(num_emitted), emitted])
    assert torch.all(result.logprobs[0, num_emitted:] == 0)
    top_values, top_ids = result.top_logprobs
    assert top_ids[0, :num_emitted, 0].tolist() == ROW_ARGMAX[:num_emitted]
    assert torch.all(top_ids[0, num_emitted:] == PAD_TOKEN_ID)


def test_verify_greedy_batch_mixes_outcomes():
    logits = peaked_logits(ROW_ARGMAX, VOCAB)[None].repeat(3, 1, 1)
    drafts = torch.tensor([[3, 7, 5], [4, 7, 5], [3, 0, 5]])
    result = verify_drafts(logits, drafts, [make_row(temperature=0) for _ in range(3)])
    assert result.num_accepted.tolist() == [3, 0, 1]
    assert result.token_ids.tolist() == [[3, 7, 5, 1], [3, -1, -1, -1], [3, 7, -1, -1]]


def test_verify_penalties_see_drafts():
    # Rows 0 and 1 both prefer 5 over 3 by 1.0; a presence penalty of 2 on 5 flips row 1 only if the
    # draft d1 = 5 counts as generated there.
    logits = torch.zeros(1, 3, VOCAB)
    logits[0, :2, 5], logits[0, :2, 3] = 2.0, 1.0
    logits[0, 2, 8] = 3.0
    drafts = torch.tensor([[5, 3]])
    penalised = verify_drafts(logits, drafts, [make_row(temperature=0, presence_penalty=2.0)])
    assert penalised.token_ids.tolist() == [[5, 3, 8]]
    plain = verify_drafts(logits, drafts, [make_row(temperature=0)])
    assert plain.token_ids.tolist() == [[5, 5, -1]]


# ---------------------------------------------------------------------------------------------
# verify_drafts, sampled: exact distributions


def random_target(seed: int, vocab_size=VOCAB) -> torch.Tensor:
    return torch.randn(vocab_size, generator=generator(seed))


def verify_many(seq_logits: torch.Tensor, drafts: list[int], params: dict, seed: int):
    """Verify the same sequence NUM_DIST_SAMPLES times (unseeded rows, fixed default generator)."""
    logits = seq_logits[None].expand(NUM_DIST_SAMPLES, -1, -1)
    draft_ids = torch.tensor(drafts)[None].expand(NUM_DIST_SAMPLES, -1)
    rows = [make_row(**params) for _ in range(NUM_DIST_SAMPLES)]
    return verify_drafts(logits, draft_ids, rows, default_generator=generator(seed))


def sample_many(logits: torch.Tensor, params: dict, seed: int) -> torch.Tensor:
    rows = [make_row(**params) for _ in range(NUM_DIST_SAMPLES)]
    return sample(logits[None].expand(NUM_DIST_SAMPLES, -1), rows,
                  default_generator=generator(seed)).token_ids


def pick_draft(probs: np.ndarray, which: str) -> int:
    support = np.flatnonzero(probs > 0)
    if which == "likely":
        return int(np.argmax(probs))
    if which == "unlikely":
        return int(support[np.argmin(probs[support])])
    return int(np.flatnonzero(probs == 0)[0])  # "outside-support"


@pytest.mark.parametrize("top_p, which_draft", [
    (1.0, "likely"), (1.0, "unlikely"),
    (0.8, "likely"), (0.8, "unlikely"), (0.8, "outside-support"),
], ids=lambda v: f"top_p={v}" if isinstance(v, float) else f"draft={v}")
def test_verify_first_token_follows_target(top_p, which_draft):
    first_logits = random_target(20)
    probs = reference_probs(first_logits, top_p=top_p)
    draft = pick_draft(probs, which_draft)
    seq_logits = torch.stack([first_logits, random_target(21)])  # Q = 2
    result = verify_many(seq_logits, [draft], dict(top_p=top_p), seed=30)

    verified = histogram(result.token_ids[:, 0], VOCAB)
    assert_follows(verified, probs)
    sampled = histogram(sample_many(first_logits, dict(top_p=top_p), seed=31), VOCAB)
    assert_follows(sampled, probs)
    assert_same_distribution(verified, sampled)

    acceptance = (result.num_accepted == 1).double().mean().item()
    tolerance = 5 * math.sqrt(probs[draft] * (1 - probs[draft]) / NUM_DIST_SAMPLES)
    assert abs(acceptance - probs[draft]) <= tolerance
    assert torch.all(result.token_ids[result.num_accepted == 0, 1] == PAD_TOKEN_ID)


@pytest.mark.parametrize("top_p", [1.0, 0.8], ids=lambda p: f"top_p={p}")
def test_verify_bonus_token_follows_last_row(top_p):
    # Drafts with p = 1 in rows 0 and 1 are always accepted; the bonus must follow row 2.
    certain = torch.full((2, VOCAB), -50.0)
    certain[0, 4], certain[1, 9] = 50.0, 50.0
    last_logits = random_target(22)
    result = verify_many(torch.cat([certain, last_logits[None]]), [4, 9], dict(top_p=top_p), seed=32)
    assert torch.all(result.num_accepted == 2)
    assert torch.all(result.token_ids[:, :2] == torch.tensor([4, 9]))
    assert_follows(histogram(result.token_ids[:, 2], VOCAB), reference_probs(last_logits, top_p=top_p))


def test_verify_second_token_follows_its_row_given_first_accepted():
    rows_logits = torch.stack([random_target(23), random_target(24), random_target(25)])
    probs = [reference_probs(logits) for logits in rows_logits]
    first_draft = int(np.argmax(probs[0]))
    result = verify_many(rows_logits, [first_draft, 0], {}, seed=33)
    went_on = result.num_accepted >= 1
    assert abs(went_on.double().mean().item() - probs[0][first_draft]) < 0.03
    assert_follows(histogram(result.token_ids[went_on, 1], VOCAB), probs[1])
