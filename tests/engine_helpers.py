"""Shared pieces of the engine tests: prompts, transformers' greedy reference, pool checks."""

import random

import torch

from worker import LLM, SamplingParams

TOKEN_RANGE = 1000  # below the tiny tokenizer's special tokens


def make_prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TOKEN_RANGE) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir, prompts, max_tokens) -> list[list[int]]:
    """Greedy continuation by transformers' Qwen3NextForCausalLM forward with its own cache.

    Not `generate()`: on one of our prompts (150 tokens, tiny preset) transformers 5.24's generate
    picked a token 2.4 logits below the argmax of its own forward, cached or not.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf(torch.tensor([prompt]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(max_tokens - 1):
                out = hf(torch.tensor([[tokens[-1]]]), cache=_cache_of(out), use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outputs.append(tokens)
    return outputs


def _cache_of(output):
    return getattr(output, "past_key_values", None) or output.cache


def make_llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("cache_memory_bytes", 32 << 20)
    return LLM(model_dir, **kwargs)


def greedy(max_tokens, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def assert_pool_full(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["num_free_blocks"] == stats["num_blocks"], stats
    assert stats["num_free_state_groups"] == stats["num_state_groups"], stats
    assert not llm.engine.runner.requests, "runner kept sampling state of finished requests"


def count_forward_passes(llm: LLM) -> list[int]:
    """Wrap the runner so each executed plan with sequences is counted; -> the live counter."""
    counter = [0]
    execute = llm.engine.runner.execute

    def counted(plan):
        if plan.sequences:
            counter[0] += 1
        return execute(plan)

    llm.engine.runner.execute = counted
    return counter
