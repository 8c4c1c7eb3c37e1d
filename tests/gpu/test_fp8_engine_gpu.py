"""The engine on an FP8 tiny checkpoint on CUDA, where the FP8 linear layers and the FP8 MoE run as
Triton kernels: greedy MTP k = 2 gives k = 0's tokens (before the first near-tie), and the first
tokens' logprobs agree with the CPU references."""

import pytest
import torch

from tests.engine_helpers import greedy, make_llm, make_prompts
from tests.test_fp8_engine import MAX_TOKENS, PROMPT_LENGTHS, decided_prefix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = dict(device="cuda", gpu_memory_utilization=0.3, num_kv_blocks=1024)


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=128)


def test_fp8_greedy_mtp_k2_equals_no_speculation_on_cuda(model_dir):
    prompts = make_prompts(PROMPT_LENGTHS, seed=11)
    plain = make_llm(model_dir, dtype="bfloat16", **CUDA).generate(prompts, greedy(MAX_TOKENS, logprobs=2))
    outputs = make_llm(model_dir, dtype="bfloat16", speculative_tokens=2, **CUDA).generate(
        prompts, greedy(MAX_TOKENS, logprobs=2))
    compared = 0
    for out, ref in zip(outputs, plain):
        n = decided_prefix(ref.logprobs)
        assert out.token_ids[:n] == ref.token_ids[:n]
        compared += n
    assert compared >= 0.8 * len(prompts) * MAX_TOKENS


def test_fp8_kernels_agree_with_the_cpu_references(model_dir):
    prompts = make_prompts(PROMPT_LENGTHS, seed=11)
    params = greedy(1, logprobs=5)
    cuda = make_llm(model_dir, dtype="bfloat16", **CUDA).generate(prompts, params)
    cpu = make_llm(model_dir, dtype="bfloat16").generate(prompts, params)
    diffs = [abs(a.logprobs[0][0] - b.logprobs[0][0]) for a, b in zip(cuda, cpu)]
    assert max(diffs) < 0.1, diffs
    assert sum(a.token_ids == b.token_ids for a, b in zip(cuda, cpu)) >= len(prompts) - 1
