"""Whole engine on the GPU: greedy tokens with the Triton kernels equal those of the torch references."""

import gc

import pytest
import torch

from tests.engine_helpers import greedy, make_llm
from tests.kernels.conftest import HAS_CUDA
from worker import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.fixture
def reference_backend():
    yield
    kernels.set_kernel_backend("auto")


@pytest.mark.parametrize("k", [0, 2], ids=["no-mtp", "k2"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-tp"])
def test_greedy_tokens_equal_reference_kernels(checkpoint_factory, reference_backend, preset, k):
    model_dir = checkpoint_factory(preset, dtype="float32")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 700, (n,), generator=gen).tolist() for n in (1, 17, 70, 150)]  # every preset's vocab

    def run(backend):
        kernels.set_kernel_backend(backend)
        llm = make_llm(model_dir, device="cuda", speculative_tokens=k, max_num_batched_tokens=96, max_num_seqs=8,
                       num_kv_blocks=256)
        tokens = [o.token_ids for o in llm.generate(prompts, greedy(24))]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return tokens

    assert run("auto") == run("torch")
