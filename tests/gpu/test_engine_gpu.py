"""The engine on CUDA through the same code as on the CPU (run on the device machine).

Results that are reported rather than asserted (bf16 differences) are appended as JSON lines to
$NEXTSERVE_GPU_RESULTS when it is set.
"""

import json
import os

import pytest
import torch

from tests.engine_helpers import greedy, make_prompts
from worker import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = make_prompts([1, 9, 64, 200], seed=21)


def report(**fields) -> None:
    path = os.environ.get("NEXTSERVE_GPU_RESULTS")
    if path:
        fields["card"] = torch.cuda.get_device_name()
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def run(model_dir, prompts, params, **kwargs):
    with LLM(model_dir, **kwargs) as llm:
        return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def cpu_tokens(model_dir):
    return [o.token_ids for o in run(model_dir, PROMPTS, greedy(48), cache_memory_bytes=64 << 20)]


@pytest.mark.parametrize("k", [0, 1, 2, 3], ids=["k0", "k1", "k2", "k3"])
def test_cuda_fp32_greedy_equals_cpu(model_dir, cpu_tokens, k):
    """Through the CUDA graphs (on by default): with MTP on, the greedy tokens are k = 0's (and the CPU's)."""
    outputs = run(model_dir, PROMPTS, greedy(48), device="cuda", dtype="float32", speculative_tokens=k,
                  gpu_memory_utilization=0.5)
    assert [o.token_ids for o in outputs] == cpu_tokens


def test_cuda_bf16_against_fp32(model_dir):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5)
    fp32 = run(model_dir, PROMPTS, params, device="cuda", dtype="float32", gpu_memory_utilization=0.5)
    bf16 = run(model_dir, PROMPTS, params, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    first_token_agreement = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp32, bf16)) / len(PROMPTS)
    diffs = [abs(a.logprobs[0][0] - b.logprobs[0][0]) for a, b in zip(fp32, bf16)]
    report(test="bf16_vs_fp32_single_gpu", first_token_agreement=first_token_agreement,
           max_first_logprob_diff=max(diffs))
    assert all(len(o.token_ids) == 16 for o in bf16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_against_tp1(checkpoint_factory):
    model_dir = checkpoint_factory("tiny-tp")
    prompts = [[t % 700 for t in p] for p in PROMPTS]
    common = dict(device="cuda", gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5)
    tp1 = run(model_dir, prompts, params, dtype="float32", **common)
    tp2 = run(model_dir, prompts, params, dtype="float32", tensor_parallel_size=2, **common)
    assert [o.token_ids for o in tp2] == [o.token_ids for o in tp1]
    fp32_diff = max(abs(a[0] - b[0]) for x, y in zip(tp1, tp2) for a, b in zip(x.logprobs, y.logprobs))
    tp1_bf16 = run(model_dir, prompts, params, dtype="bfloat16", **common)
    tp2_bf16 = run(model_dir, prompts, params, dtype="bfloat16", tensor_parallel_size=2, **common)
    first = [(a.logprobs[0], b.logprobs[0]) for a, b in zip(tp1_bf16, tp2_bf16)]
    bf16_diff = max(abs(a[0] - b[0]) for a, b in first)
    agreement = sum(a.token_ids == b.token_ids for a, b in zip(tp1_bf16, tp2_bf16)) / len(prompts)
    report(test="tp2_nccl_vs_tp1", fp32_tokens_identical=True, fp32_max_logprob_diff=fp32_diff,
           bf16_first_token_logprob_max_diff=bf16_diff, bf16_sequences_identical_fraction=agreement)
