"""Tensor parallelism on the CPU (gloo): tp = 2 and 4 give tp = 1's tokens, logits and prompt logprobs.

The tiny-tp preset is shaped so every split path runs: 4 GDN key-head groups, 2 KV heads (tp=4
replicates them), 8 experts split along the intermediate size, a vocabulary split in 4.
"""

import json

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine_helpers import make_prompts
from tests.rank_process import leave_group_and_exit
from worker import LLM, SamplingParams
from worker.config import ConfigError

PROMPTS = [[t % 700 for t in p] for p in make_prompts([3, 29, 70], seed=11)]


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny-tp")


def generate(model_dir, tp, k, params):
    with LLM(model_dir, tensor_parallel_size=tp, speculative_tokens=k, cache_memory_bytes=32 << 20) as llm:
        return llm.generate(PROMPTS, params)


@pytest.fixture(scope="module")
def single_rank(model_dir):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=20, prompt_logprobs=5)
    return {k: generate(model_dir, 1, k, params) for k in (0, 2)}


@pytest.mark.parametrize("k", [0, 2], ids=["no-mtp", "mtp-k2"])
@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_tokens_and_logprobs_equal_one_rank(model_dir, single_rank, tp, k):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=20, prompt_logprobs=5)
    outputs = generate(model_dir, tp, k, params)
    for out, ref in zip(outputs, single_rank[k]):
        assert out.token_ids == ref.token_ids
        assert out.num_accepted_tokens == ref.num_accepted_tokens
        for (lp, top), (ref_lp, ref_top) in zip(out.logprobs, ref.logprobs):
            assert abs(lp - ref_lp) < 1e-4
            assert [t for t, _ in top] == [t for t, _ in ref_top]
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, ref_top)) < 1e-4
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ref.prompt_logprobs)
        for (lp, top), (ref_lp, ref_top) in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert abs(lp - ref_lp) < 1e-4
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, ref_top)) < 1e-4


def _rank_logits(rank, size, port, model_dir, result):
    from worker.engine.cache_tensors import CacheShapes, allocate_and_bind
    from worker.engine.config import EngineConfig
    from worker.engine.step_inputs import SequenceSlice, build_step_inputs
    from worker.model.context import forward_context
    from worker.model.loader import load_model
    from worker.parallel.group import connect_store, join_group

    torch.set_num_threads(1)
    if size > 1:
        join_group(EngineConfig(model=str(model_dir), tensor_parallel_size=size), rank, connect_store(rank, port))
    model = load_model(model_dir)
    allocate_and_bind(model, CacheShapes.for_model(model, 16, 0, torch.float32), 64, len(PROMPTS), "cpu")
    slices, start = [], 0
    for i, prompt in enumerate(PROMPTS):
        blocks = list(range(start, start + 8))
        start += 8
        slices.append(SequenceSlice(prompt, 0, blocks, state_group=i))
    input_ids, positions, ctx = build_step_inputs(slices, 16, 1, "cpu")
    with torch.inference_mode(), forward_context(ctx):
        logits = model.compute_logits(model(input_ids, positions))
    if rank == 0:
        result.put(logits.numpy().tolist())
    if size > 1:
        leave_group_and_exit(result)


def _logits_with(model_dir, size):
    from tests.serving.conftest import free_port

    context = mp.get_context("spawn")
    result, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank_logits, args=(r, size, port, model_dir, result)) for r in range(size)]
    for p in processes:
        p.start()
    logits = torch.tensor(result.get(timeout=120))
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    return logits


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_prefill_logits_within_1e4_of_one_rank(model_dir, tp):
    reference = _logits_with(model_dir, 1)
    assert (_logits_with(model_dir, tp) - reference).abs().max().item() < 1e-4


def test_sizes_that_do_not_divide_are_refused_before_starting_ranks(model_dir):
    with pytest.raises(ConfigError, match="does not divide num_attention_heads"):
        LLM(model_dir, tensor_parallel_size=3, cache_memory_bytes=32 << 20)


def test_a_draft_vocabulary_at_tp2_keeps_one_ranks_tokens(model_dir, single_rank, tmp_path):
    """--speculative-token-map with ids in both ranks' vocabulary slices: each rank drafts from its rows
    and zeros, one all-reduce sums the logits; greedy k = 2 still gives k = 0's tokens."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    path = tmp_path / "map.json"
    path.write_text(json.dumps(list(range(1, vocab, 3))))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    with LLM(model_dir, tensor_parallel_size=2, speculative_tokens=2, speculative_token_map=str(path),
             cache_memory_bytes=32 << 20) as llm:
        outputs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in single_rank[0]]
