"""KnownTokensProposer: drafts a request's known tokens from a device table inside the decode step,
so always-right drafts need no host work; wrong ones stay lossless; no row reads out of bounds."""

import pytest
import torch

from tests.engine_helpers import assert_pool_full, greedy, make_llm, make_prompts
from worker.engine.plan import ScheduledSequence, StepPlan
from worker.engine.proposer import FALLBACK_TOKEN, KnownTokensProposer
from worker.model.context import PAD_SLOT, GDNMetadata, StepContext, forward_context

MAX_TOKENS = 24
MAX_K = 3
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 512
BATCHES = {"batch1": [17], "batch3": [4, 33, 80]}


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def reference(model_dir):
    """-> {prompt lengths: (prompts, k = 0 greedy continuations past MAX_TOKENS, so every draft has a truth)}."""
    llm = make_llm(model_dir, max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN)
    out = {}
    for name, lengths in BATCHES.items():
        prompts = make_prompts(lengths, seed=5)
        out[name] = prompts, [o.token_ids for o in llm.generate(prompts, greedy(MAX_TOKENS + MAX_K + 2))]
    return out


def run_engine(llm, prompts, known_continuations):
    """Generate MAX_TOKENS greedily per prompt through the engine, the proposer knowing `known_continuations`;
    -> the outputs in prompt order, and how many steps were planned ahead."""
    engine = llm.engine
    proposer = engine.worker.runner.proposer
    for i, (prompt, continuation) in enumerate(zip(prompts, known_continuations)):
        proposer.known[f"r{i}"] = prompt + continuation
        engine.add_request(f"r{i}", prompt, greedy(MAX_TOKENS))
    finished = {}
    while engine.has_unfinished:
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    return [finished[f"r{i}"] for i in range(len(prompts))]


def known_tokens_llm(model_dir, k, **kwargs):
    proposer = KnownTokensProposer({}, k, MAX_NUM_SEQS, MAX_MODEL_LEN, "cpu")
    return make_llm(model_dir, speculative_tokens=k, proposer=proposer, max_num_seqs=MAX_NUM_SEQS,
                    max_model_len=MAX_MODEL_LEN, **kwargs)


# chunked: 16 tokens a step, so steps mix decodes and prefills (drafts from `propose`)
SCHEDULES = {"sync": {}, "async": dict(async_scheduling=True), "chunked": dict(max_num_batched_tokens=16)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"k{k}")
def test_known_continuation_is_always_accepted(model_dir, reference, k, batch, schedule):
    prompts, continuations = reference[batch]
    llm = known_tokens_llm(model_dir, k, **SCHEDULES[schedule])
    graphs = llm.engine.worker.decode_graphs
    assert graphs.proposer is llm.engine.runner.proposer, "the decode step drafts, not the host"
    outputs = run_engine(llm, prompts, continuations)
    assert [o.token_ids for o in outputs] == [c[:MAX_TOKENS] for c in continuations]
    for out in outputs:
        assert out.num_drafted_tokens > 0
        assert out.num_accepted_tokens == out.num_drafted_tokens
        assert out.mean_accepted_length == pytest.approx(k + 1)
    assert graphs.num_eager_steps > 0  # decode steps ran the graphs' step (eagerly on the CPU)
    if schedule == "async":
        assert llm.engine.num_steps_ahead > 0
    assert_pool_full(llm)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"k{k}")
def test_wrong_known_tokens_stay_lossless(model_dir, reference, k, batch):
    prompts, continuations = reference[batch]
    llm = known_tokens_llm(model_dir, k)
    vocab = llm.engine.model_config.vocab_size
    wrong = [[(t + 1) % vocab for t in c] for c in continuations]  # no draft is the greedy token
    outputs = run_engine(llm, prompts, wrong)
    assert [o.token_ids for o in outputs] == [c[:MAX_TOKENS] for c in continuations]
    for out in outputs:
        assert out.num_drafted_tokens > 0 and out.num_accepted_tokens == 0
    assert_pool_full(llm)


def prefill_end(request_id, state_group, length=4):
    return ScheduledSequence(request_id, [1] * length, 0, [0], state_group, 1, is_decode=False, sample=True)


def test_unknown_rows_and_positions_past_the_table_draft_the_fallback():
    k, max_len = 3, 8
    proposer = KnownTokensProposer({"a": list(range(100, 108)), "long": list(range(200, 230))}, k, 3, max_len,
                                   "cpu")
    proposer.write_rows(StepPlan(1, [prefill_end("a", 0), prefill_end("long", 2), prefill_end("unknown", 1)]))
    assert proposer.tokens[2].tolist() == list(range(200, 208)), "cut to the table"
    # rows: a at 0; a near the end; a past the end; unknown; long; a slot group past the table; padding
    groups = torch.tensor([0, 0, 0, 1, 2, 7, PAD_SLOT])
    positions = torch.tensor([0, 4, 40, 0, 1, 0, 0])
    anchor_rows = torch.arange(7)
    row_valid = torch.tensor([True] * 6 + [False])
    gdn = GDNMetadata(num_decodes=7, decode_query_len=1, state_indices=groups, num_accepted=torch.ones(7),
                      has_initial_state=torch.ones(7, dtype=torch.bool), prefill_cu_seqlens=torch.zeros(1))
    with forward_context(StepContext(None, gdn)):
        drafts = proposer.draft(None, positions, positions, None, anchor_rows, positions, row_valid=row_valid)
    f = FALLBACK_TOKEN
    assert drafts.tolist() == [[102, 103, 104], [106, 107, f], [f, f, f], [f, f, f], [203, 204, 205], [f, f, f],
                               [f, f, f]]
    with forward_context(StepContext(None, gdn)):
        picked = proposer.draft(None, positions, positions, None, anchor_rows, positions,
                                sampled=torch.tensor([4, 0]), row_valid=torch.tensor([True, False]))
    assert picked.tolist() == [[203, 204, 205], [f, f, f]]


def test_a_slot_group_outside_the_table_is_refused():
    proposer = KnownTokensProposer({}, 1, 2, 8, "cpu")
    with pytest.raises(ValueError, match="outside the table"):
        proposer.write_rows(StepPlan(1, [prefill_end("a", 2)]))
