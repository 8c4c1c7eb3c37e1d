"""Shared pieces of the engine tests: prompts, transformers' greedy reference, pool checks."""

import contextlib
import random
from dataclasses import dataclass

import torch

from tests.near_ties import NearTie, RoutingWatch, greedy_near_ties
from worker import LLM, SamplingParams

TOKEN_RANGE = 1000  # below the tiny tokenizer's special tokens


@contextlib.contextmanager
def gdn_decode_form(monkeypatch, form: str):
    """NEXTSERVE_GDN_DECODE=form inside the block; the form is read once per process, so its cache is cleared
    on the way in and out."""
    from worker.kernels import triton_gdn_decode

    monkeypatch.setenv("NEXTSERVE_GDN_DECODE", form)
    triton_gdn_decode.decode_form.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("NEXTSERVE_GDN_DECODE")
        triton_gdn_decode.decode_form.cache_clear()


def make_prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TOKEN_RANGE) for _ in range(n)] for n in lengths]


@dataclass
class GreedyReference:
    """Transformers' greedy continuation of one prompt, and how much of it is decided: the tokens
    before the first routing or greedy near-tie (tests/near_ties.py). After that tie, fp32 rounding
    picks the next token, so a test compares `tokens[:num_decided]` only."""

    tokens: list[int]
    num_decided: int
    first_tie: NearTie | None

    def __str__(self) -> str:
        tie = f"; the rest follow a near-tie, {self.first_tie}" if self.first_tie else ""
        return f"{self.num_decided} of {len(self.tokens)} tokens compared{tie}"


def hf_greedy(model_dir, prompts, max_tokens) -> list[GreedyReference]:
    """Greedy continuation by transformers' Qwen3NextForCausalLM forward with its own cache.

    Not `generate()`: on one of our prompts (150 tokens, tiny preset) transformers 5.24's generate
    picked a token 2.4 logits below the argmax of its own forward, cached or not.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad(), RoutingWatch(hf) as watch:
        for prompt in prompts:
            watch.reset()
            out = hf(torch.tensor([prompt]), use_cache=True)
            rows = [out.logits[0, -1]]  # row i picks generated token i
            for _ in range(max_tokens - 1):
                out = hf(torch.tensor([[int(rows[-1].argmax())]]), cache=_cache_of(out), use_cache=True)
                rows.append(out.logits[0, -1])
            outputs.append(_decided(torch.stack(rows), len(prompt), watch.first_near_tie()))
    return outputs


def _decided(rows: torch.Tensor, prompt_len: int, routing_tie: NearTie | None) -> GreedyReference:
    """Generated token i comes from the logits at position prompt_len - 1 + i, which depend on the
    routing of every position up to there."""
    tokens = rows.argmax(dim=-1).tolist()
    limits = [(len(tokens), None)]
    if routing_tie is not None:
        limits.append((max(0, routing_tie.position - prompt_len + 1), routing_tie))
    greedy_ties = greedy_near_ties(rows)
    if greedy_ties:
        limits.append((greedy_ties[0].position, greedy_ties[0]))
    num_decided, tie = min(limits, key=lambda limit: limit[0])
    return GreedyReference(tokens, num_decided, tie)


def assert_equal_to_reference(outputs, references: list[GreedyReference], min_decided: float = 0.9) -> None:
    """Our tokens equal transformers' wherever its choices are decided, and that is most of them."""
    for out, ref in zip(outputs, references):
        n = ref.num_decided
        assert out.token_ids[:n] == ref.tokens[:n], (
            f"prompt of {len(out.prompt_token_ids)} tokens diverges from transformers ({ref})")
    decided, total = sum(r.num_decided for r in references), sum(len(r.tokens) for r in references)
    assert decided >= min_decided * total, (
        f"only {decided} of {total} reference tokens are free of near-ties: change the prompts")


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
    launch = llm.engine.runner.launch

    def counted(plan, *args, **kwargs):
        if plan.sequences:
            counter[0] += 1
        return launch(plan, *args, **kwargs)

    llm.engine.runner.launch = counted
    return counter
