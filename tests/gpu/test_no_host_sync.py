"""Whole engine steps on CUDA never wait for the device, but for the one event wait on the step's
results: under `torch.cuda.set_sync_debug_mode("error")` any other synchronising call (`.item()`,
`.tolist()`, a blocking copy, `nonzero`) raises. Qwen3-Next-80B's per-layer shapes (4 layers: 3 GDN
+ 1 attention, plus the MTP layer) with random weights made on the device."""

from contextlib import contextmanager

import pytest
import torch

from tests.engine_helpers import gdn_decode_form
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.proposer import KnownTokensProposer
from worker.engine.sampling_params import SamplingParams
from worker.tools.model_shapes import write_shape_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_shape_config(tmp_path_factory.mktemp("qwen3-next-80b-4l"), num_layers=4)


def make_engine(model_dir, k: int, proposer=None, **overrides) -> LLMEngine:
    config = dict(model=str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                  speculative_tokens=k, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048,
                  gpu_memory_utilization=0.5)
    return LLMEngine(EngineConfig(**{**config, **overrides}), proposer)


def add_requests(engine: LLMEngine, num: int, prompt_len: int, params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    for i in range(num):
        prompt = torch.randint(0, 150000, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, params)


@pytest.mark.parametrize("logprobs", [None, 2], ids=["no-logprobs", "logprobs"])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("k", [0, 2], ids=["decode", "verify-k2"])
def test_steps_never_sync(model_dir, k, sampling, logprobs):
    """The decode steps replay CUDA graphs, with logprobs too; prefill steps (prompt logprobs) run eagerly."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0 if sampling == "greedy" else 0.8,
                            top_p=0.9 if sampling == "sampled" else 1.0, logprobs=logprobs,
                            prompt_logprobs=1 if sampling == "sampled" and logprobs else None)
    check_steps_never_sync(model_dir, k, params)


@pytest.mark.parametrize("form", ["one", "two"])
def test_gdn_decode_forms_never_sync(model_dir, form, monkeypatch):
    """The GDN decode step's other forms (NEXTSERVE_GDN_DECODE) at the 80B's shapes, verify k = 2."""
    with gdn_decode_form(monkeypatch, form):
        check_steps_never_sync(model_dir, 2, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0))


def check_steps_never_sync(model_dir, k: int, params: SamplingParams) -> None:
    """Four 128-token prompts: the prefill step, then eight decode steps, all under sync-is-an-error."""
    engine = make_engine(model_dir, k)
    add_requests(engine, 4, 128, params)
    outputs = []
    graphs = engine.worker.decode_graphs
    try:
        with syncs_are_errors():
            outputs += engine.step()  # the prefill step (512 tokens: all four prompts at once)
            for _ in range(8):
                outputs += engine.step()
        replays, eager_steps = graphs.num_replays, graphs.num_eager_steps
    finally:
        engine.shutdown()
        del engine, graphs  # a failure's traceback must not keep the caches alive for the next test
    assert any(out.new_token_ids for out in outputs)
    assert replays > 0 and eager_steps == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_known_token_drafts_never_sync(model_dir, async_scheduling):
    """KnownTokensProposer drafts inside the graphs: no host work per step, and steps planned ahead."""
    known = {}
    proposer = KnownTokensProposer(known, 2, 8, 2048, "cuda")
    engine = make_engine(model_dir, 2, proposer, async_scheduling=async_scheduling)
    add_requests(engine, 4, 128, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0))
    known.update({f"r{i}": list(range(1000, 1200)) for i in range(3)})  # r3 stays unknown
    outputs = []
    graphs = engine.worker.decode_graphs
    try:
        with syncs_are_errors():
            for _ in range(9):
                outputs += engine.step()
        replays, eager_steps, ahead = graphs.num_replays, graphs.num_eager_steps, engine.num_steps_ahead
    finally:
        engine.shutdown()
        del engine, graphs
    assert any(out.new_token_ids for out in outputs)
    assert proposer.tokens[:, 130].tolist().count(1130) == 3, "the three known requests' rows were written"
    assert replays > 0 and eager_steps == 0
    assert (ahead > 0) == async_scheduling
