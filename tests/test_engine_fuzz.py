"""Seeded random runs of the engine: random configs (k, async scheduling, chunk budget, batch, cache
size, length limit) and random requests (greedy or sampled, logprobs, penalties, min_tokens, stop ids,
prompt logprobs, prompts up to the length limit) arriving while others run, some aborted mid-run.

Also at tensor parallel size 2 (gloo). Checked, whatever tokens the model picks (so the same on every CPU): no step raises, every request
ends once with a valid reason and at most max_tokens tokens, and the pools are full again at the end.
The scenarios are drawn from fixed seeds; this found the async-scheduling bug after min_tokens.
"""

import random

import pytest

from tests.engine_helpers import assert_pool_full
from worker import LLM, SamplingParams

TOKEN_RANGE = 500  # inside every tiny preset's vocabulary, below its special tokens
MAX_STEPS = 5000


def random_config(rng: random.Random) -> dict:
    return dict(speculative_tokens=rng.choice([0, 1, 2, 3]), async_scheduling=rng.random() < 0.5,
                max_num_batched_tokens=rng.choice([16, 24, 64, 256]), max_num_seqs=rng.choice([1, 2, 4, 8]),
                num_kv_blocks=rng.choice([8, 12, 20, 60]), max_model_len=rng.choice([64, 128]),
                cache_memory_bytes=32 << 20)


def random_params(rng: random.Random) -> SamplingParams:
    kw = dict(max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.5:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(100) if rng.random() < 0.7 else None,
                  top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]))
    if rng.random() < 0.2:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.15:
        kw["repetition_penalty"] = 1.2
    if rng.random() < 0.15:
        kw["min_tokens"] = min(rng.randint(1, 5), kw["max_tokens"])
    if rng.random() < 0.2:
        kw["stop_token_ids"] = [rng.randrange(TOKEN_RANGE) for _ in range(3)]
    if rng.random() < 0.1:
        kw["prompt_logprobs"] = 1
    return SamplingParams(**kw)


def random_requests(rng: random.Random) -> list[tuple[str, list[int], SamplingParams]]:
    """Short prompts and ones near (or past: refused) the longer length limit."""
    lengths = [rng.choice([rng.randint(1, 50), rng.randint(50, 130)]) for _ in range(rng.randint(1, 7))]
    return [(f"r{i}", [rng.randrange(TOKEN_RANGE) for _ in range(n)], random_params(rng))
            for i, n in enumerate(lengths)]


def run_scenario(model_dir, seed: int, **overrides) -> None:
    rng = random.Random(seed)
    with LLM(model_dir, **{**random_config(rng), **overrides}) as llm:
        engine, pending = llm.engine, random_requests(rng)
        added, aborted, finished = {}, set(), {}
        for _ in range(MAX_STEPS):
            if not (pending or engine.has_unfinished):
                break
            if pending and (not engine.has_unfinished or rng.random() < 0.3):
                request_id, prompt, params = pending.pop(0)
                try:
                    engine.add_request(request_id, prompt, params)
                    added[request_id] = params
                except ValueError as refused:  # past the length limit or the whole cache
                    assert str(refused).startswith(f"prompt has {len(prompt)} tokens"), refused
            if added and rng.random() < 0.05:
                victim = rng.choice(sorted(added))
                if victim not in finished and engine.abort(victim):
                    aborted.add(victim)
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in finished, f"{out.request_id} finished twice"
                    finished[out.request_id] = out
        else:
            pytest.fail(f"no end after {MAX_STEPS} steps")
        assert sorted(finished) == sorted(added)
        for request_id, params in added.items():
            out = finished[request_id]
            assert len(out.token_ids) <= params.max_tokens
            allowed = {"length", "stop", "abort"} if request_id in aborted else {"length", "stop"}
            assert out.finish_reason in allowed, (request_id, out.finish_reason)
        assert_pool_full(llm)


# 1,200 seeds of the first and 300 of the second passed once; CI runs the first 40 of each. Of those, 21 and 22
# raised the async-scheduling error after min_tokens masking before its fix.
@pytest.mark.parametrize("seed", range(40))
def test_random_engine_runs_end_cleanly(checkpoint_factory, seed):
    run_scenario(checkpoint_factory("tiny"), seed)


@pytest.mark.parametrize("seed", range(40))
def test_random_engine_runs_end_cleanly_bf16_dense_mix(checkpoint_factory, seed):
    run_scenario(checkpoint_factory("tiny-dense-mix", dtype="bfloat16"), seed)


@pytest.mark.parametrize("seed", range(4))
def test_random_engine_runs_end_cleanly_at_tp2(checkpoint_factory, seed):
    """Two gloo ranks, rank 0 sending every step's plan: 30 seeds passed once, CI runs 4 (3-5 s each)."""
    run_scenario(checkpoint_factory("tiny"), seed, tensor_parallel_size=2)
