"""The engine on FP8 checkpoints: greedy MTP (k = 2, drafting with the checkpoint's own FP8 MTP layer)
gives the tokens of no speculation, and `load_format="dummy"` makes a finite FP8 model from config.json."""

import json

import torch

from tests.engine_helpers import assert_pool_full, greedy, make_llm, make_prompts
from tests.near_ties import greedy_near_ties
from worker.kernels.fp8.quant import FP8_DTYPE
from worker.model.loader import load_model

PROMPT_LENGTHS = [1, 4, 17, 33, 80, 150]
MAX_TOKENS = 40
# Activation quantisation turns a last-bit difference between a decode row and a verify row (from
# the fp32 ops around the FP8 GEMMs, whose references sum in float64 to avoid exactly this) into a
# jump of one e4m3 step where a value sits at a rounding boundary; one such jump moved the logits of
# this model by ~1e-2 when the references summed in fp32. Positions whose top two logits are closer
# than that are left out, as tests/near_ties.py does (measured here: none differ by more than 5e-6).
FP8_GREEDY_MARGIN = 1e-2


def decided_prefix(logprobs, margin: float = FP8_GREEDY_MARGIN) -> int:
    """Tokens before the first greedy near-tie of a k = 0 run (top-2 logprob gap = logit gap)."""
    rows = torch.tensor([[lp for _, lp in top[:2]] for _, top in logprobs])
    ties = greedy_near_ties(rows, margin=margin)
    return ties[0].position if ties else len(logprobs)


def test_fp8_greedy_mtp_k2_equals_no_speculation(checkpoint_factory):
    model_dir = checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=128)
    # Seed 11: no near-tie in the k = 0 continuations, so every token is compared (seed 5 left 188 of 240).
    prompts = make_prompts(PROMPT_LENGTHS, seed=11)
    plain = make_llm(model_dir).generate(prompts, greedy(MAX_TOKENS, logprobs=2))
    llm = make_llm(model_dir, speculative_tokens=2, max_num_batched_tokens=96)
    assert llm.engine.model.mtp.layers[0].mlp.experts.w13.dtype == FP8_DTYPE
    outputs = llm.generate(prompts, greedy(MAX_TOKENS, logprobs=2))
    compared = 0
    for out, ref in zip(outputs, plain):
        n = decided_prefix(ref.logprobs)
        assert out.token_ids[:n] == ref.token_ids[:n]
        compared += n
        assert out.num_drafted_tokens > 0 and 0 <= out.num_accepted_tokens <= out.num_drafted_tokens
    assert compared >= 0.9 * len(prompts) * MAX_TOKENS, f"only {compared} tokens free of near-ties"
    assert_pool_full(llm)


def test_dummy_fp8_weights_from_config_alone_keep_activations_finite(checkpoint_factory, tmp_path):
    source = checkpoint_factory("tiny-dense-mix", dtype="bfloat16", fp8_block_size=32)
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((source / name).read_text())
    model = load_model(tmp_path, torch.bfloat16, load_format="dummy")
    experts = model.model.layers[3].mlp.experts
    assert experts.w13.dtype == FP8_DTYPE and experts.w13.float().abs().max() <= 448
    scales = experts.w13_scale_inv
    assert torch.isfinite(scales).all() and scales.min() > 0 and scales.max() / scales.min() > 1.2
    assert model.lm_head.weight.dtype == torch.bfloat16
    config = json.loads((tmp_path / "config.json").read_text())
    llm = make_llm(tmp_path, load_format="dummy", dtype="bfloat16")
    out = llm.generate([[t % 500 for t in p] for p in make_prompts([9, 30], seed=1)], greedy(6, logprobs=1))
    assert config["quantization_config"]["quant_method"] == "fp8"
    for seq in out:
        assert len(seq.token_ids) == 6 and all(torch.isfinite(torch.tensor(lp)) for lp, _ in seq.logprobs)
