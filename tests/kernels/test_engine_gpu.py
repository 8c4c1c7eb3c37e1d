"""Whole engine on the GPU: greedy tokens with the Triton kernels equal those of the torch references."""

import pytest

from tests.engine_helpers import greedy, make_llm, make_prompts
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
    prompts = make_prompts([1, 17, 70, 150], seed=5)

    def run(backend):
        kernels.set_kernel_backend(backend)
        llm = make_llm(model_dir, device="cuda", speculative_tokens=k, max_num_batched_tokens=96)
        return [o.token_ids for o in llm.generate(prompts, greedy(24))]

    assert run("auto") == run("torch")
