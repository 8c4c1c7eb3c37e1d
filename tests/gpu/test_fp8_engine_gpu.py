"""The engine on an FP8 tiny checkpoint on CUDA, where the FP8 linear layers and the FP8 MoE run as
Triton kernels: greedy MTP k = 2 gives k = 0's tokens (before the first near-tie), and the first
tokens' logprobs agree with the CPU references.

Activations are float32 here. Quantising them to e4m3 is a step function, so any rounding difference
upstream flips some of them by a whole e4m3 step (1/16), and the random tiny model amplifies that. On
the CPU alone, scaling its norm weights by 1 + 1e-6 moves the first-token logprobs by up to 0.063,
and bf16 against fp32 activations by up to 0.88. Measured on an H200, the CUDA kernels against the CPU
references differed by up to 1.7 in bf16 and 0.195 in fp32 (2026-12-01). So these engine-level checks
allow CHAOS_MARGIN: a wrong kernel is off by whole nats. The kernels' own parity at the same
quantised inputs is tests/kernels/test_fp8_linear.py and test_moe_fp8.py."""

import pytest
import torch

from tests.engine_helpers import greedy, make_llm, make_prompts
from tests.test_fp8_engine import MAX_TOKENS, PROMPT_LENGTHS, decided_prefix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = dict(device="cuda", gpu_memory_utilization=0.3, num_kv_blocks=1024)
CHAOS_MARGIN = 0.5


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=128)


def test_fp8_greedy_mtp_k2_equals_no_speculation_on_cuda(model_dir):
    prompts = make_prompts(PROMPT_LENGTHS, seed=11)
    plain = make_llm(model_dir, **CUDA).generate(prompts, greedy(MAX_TOKENS, logprobs=2))
    outputs = make_llm(model_dir, speculative_tokens=2, **CUDA).generate(
        prompts, greedy(MAX_TOKENS, logprobs=2))
    compared = 0
    for out, ref in zip(outputs, plain):
        n = decided_prefix(ref.logprobs, CHAOS_MARGIN)
        assert out.token_ids[:n] == ref.token_ids[:n], (n, out.token_ids[:n], ref.token_ids[:n])
        compared += n
    # At this margin little of a random model's greedy run is decided (6 of 240 tokens on an H200: the first
    # of each prompt); the trained built-in model quantised to FP8 fares little better (28 of 320 on the CPU).
    assert compared >= len(prompts), compared


def test_fp8_kernels_agree_with_the_cpu_references(model_dir):
    prompts = make_prompts(PROMPT_LENGTHS, seed=11)
    params = greedy(1, logprobs=5)
    cuda = make_llm(model_dir, **CUDA).generate(prompts, params)
    cpu = make_llm(model_dir).generate(prompts, params)
    diffs = [abs(a.logprobs[0][0] - b.logprobs[0][0]) for a, b in zip(cuda, cpu)]
    assert max(diffs) < CHAOS_MARGIN, diffs
    for a, b in zip(cuda, cpu):
        if decided_prefix(b.logprobs, CHAOS_MARGIN):
            assert a.token_ids == b.token_ids


def _norms(model):
    from worker.model.layers.norm import GatedRMSNorm, RMSNorm

    return [m for m in model.modules() if isinstance(m, (RMSNorm, GatedRMSNorm)) and m.quant_block is not None]


@pytest.mark.parametrize("tokens_per_sequence", [1, 3], ids=["decode", "verify"])
def test_quantising_norms_change_no_bit(model_dir, tokens_per_sequence):
    """The norms before FP8 layers write their outputs' e4m3 groups, which the FP8 linears and MoE read
    instead of quantising again: the logits are the same bits as with every layer quantising itself.
    A prefill of the prompts, then a step of 1 (decode) or 3 (verify) tokens per sequence."""
    from worker.engine.cache_tensors import CacheShapes, allocate_and_bind
    from worker.engine.step_inputs import SequenceSlice, build_step_inputs
    from worker.model.context import forward_context
    from worker.model.loader import load_model

    prompts = [[t % 500 for t in p] for p in make_prompts([5, 17], seed=3)]
    model = load_model(model_dir, dtype=torch.bfloat16, device="cuda")
    norms = _norms(model)
    assert norms, "no norm feeds an FP8 layer"
    blocks = [n.quant_block for n in norms]
    results = []
    for fused in (True, False):
        for norm, block in zip(norms, blocks):
            norm.quant_block = block if fused else None
        shapes = CacheShapes.for_model(model, 16, tokens_per_sequence - 1, torch.bfloat16)
        allocate_and_bind(model, shapes, 64, len(prompts), "cuda")
        steps = [[SequenceSlice(p, 0, list(range(8 * i, 8 * i + 8)), state_group=i) for i, p in enumerate(prompts)]]
        steps.append([SequenceSlice([7] * tokens_per_sequence, len(p), list(range(8 * i, 8 * i + 8)), state_group=i,
                                    is_decode=True) for i, p in enumerate(prompts)])
        logits = []
        for slices, query_len in zip(steps, (1, tokens_per_sequence)):
            input_ids, positions, ctx = build_step_inputs(slices, 16, query_len, "cuda")
            with torch.inference_mode(), forward_context(ctx):
                logits.append(model.compute_logits(model(input_ids, positions)))
        results.append(logits)
    for fused, unfused in zip(*results):
        assert torch.equal(fused, unfused)
