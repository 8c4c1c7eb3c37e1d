"""CUDA graphs of decode and verify steps give exactly what the same steps give eagerly.

Two engines on the same tiny checkpoint, one replaying graphs and one with `enforce_eager`, run the
same requests (greedy and seeded sampling mixed, some with logprobs, a batch padded up to its bucket)
at k = 0, 1 and 3: the tokens, their logprobs, the acceptance counts and every KV and GDN state tensor
must be bitwise equal. This is
the bug class of a drafter whose graph mode reads stale buffers (ATOM's lost gsm8k accuracy).
"""

import pytest
import torch

from tests.engine_helpers import gdn_decode_form, greedy, make_prompts
from worker import LLM, SamplingParams
from worker.engine.proposer import KnownTokensProposer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = make_prompts([3, 17, 40, 9, 64], seed=5)  # 5 sequences: bucket 8, three rows of padding


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny")


def mixed_params() -> list[SamplingParams]:
    common = dict(max_tokens=24, ignore_eos=True)
    return [
        SamplingParams(temperature=0.0, logprobs=3, **common),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, **common),
        SamplingParams(temperature=1.0, top_k=20, seed=12, logprobs=0, **common),
        SamplingParams(temperature=0.0, **common),
        SamplingParams(temperature=0.7, min_p=0.05, seed=13, logprobs=5, **common),
    ]


def caches(llm: LLM) -> list[torch.Tensor]:
    model = llm.engine.model
    tensors = [t for layer in model.attention_layers() for t in (layer.k_cache, layer.v_cache)]
    return tensors + [t for layer in model.gdn_layers() for t in (layer.conv_states, layer.ssm_states)]


def run(model_dir, params, **kwargs):
    """-> (outputs, copies of the caches, (graph replays, eager steps), whether the caches were zero
    right after start-up, i.e. capture wrote nothing)."""
    # A fixed number of KV blocks: the caches compare by shape too, and stay small enough to copy.
    with LLM(model_dir, device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8, num_kv_blocks=512, **kwargs) as llm:
        clean_after_capture = all(torch.count_nonzero(t) == 0 for t in caches(llm))
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        graphs = llm.engine.worker.decode_graphs
        counts = graphs.num_replays, graphs.num_eager_steps
        snapshot = [t.clone() for t in caches(llm)]
    torch.cuda.empty_cache()
    return outputs, snapshot, counts, clean_after_capture


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [0, 1, 3], ids=["k0", "k1", "k3"])
def test_graph_equals_eager(model_dir, k, dtype):
    params = mixed_params()
    graph_out, graph_caches, (replays, graph_eager), clean = run(model_dir, params, dtype=dtype, speculative_tokens=k)
    eager_out, eager_caches, (no_replays, eager_steps), _ = run(model_dir, params, dtype=dtype, speculative_tokens=k,
                                                                enforce_eager=True)
    assert clean, "capture wrote into a cache"
    assert replays > 0 and graph_eager == 0 and no_replays == 0 and eager_steps > 0
    assert [o.token_ids for o in graph_out] == [o.token_ids for o in eager_out]
    assert [o.logprobs for o in graph_out] == [o.logprobs for o in eager_out]
    assert [o.num_accepted_tokens for o in graph_out] == [o.num_accepted_tokens for o in eager_out]
    for i, (g, e) in enumerate(zip(graph_caches, eager_caches)):
        assert torch.equal(g, e), f"cache tensor {i} differs between graph and eager"


def test_padding_rows_write_nothing(model_dir):
    """A step of nothing but padding (what capture runs) leaves every cache as it was."""
    with LLM(model_dir, device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8, speculative_tokens=2) as llm:
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        before = [t.clone() for t in caches(llm)]
        graphs = llm.engine.worker.decode_graphs
        graphs._write_padding()
        for graph, _ in graphs.graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, caches(llm)))
        del before, graphs
    assert unchanged


def test_graph_equals_eager_with_full_size_caches(model_dir):
    """Tokens only (the two engines size their caches apart): millions of KV blocks, as served."""
    tokens = []
    for eager in (False, True):
        with LLM(model_dir, device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8, dtype="bfloat16",
                 speculative_tokens=1, enforce_eager=eager) as llm:
            tokens.append([o.token_ids for o in llm.generate(PROMPTS, mixed_params(), use_tqdm=False)])
        torch.cuda.empty_cache()
    assert tokens[0] == tokens[1]


def test_async_scheduling_equals_sync(model_dir):
    """The next decode step launched before this one's tokens are known gives the same tokens."""
    tokens = []
    for async_scheduling in (False, True):
        with LLM(model_dir, device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8, num_kv_blocks=512,
                 dtype="bfloat16", async_scheduling=async_scheduling) as llm:
            tokens.append([o.token_ids for o in llm.generate(PROMPTS, mixed_params(), use_tqdm=False)])
            assert (llm.engine.num_steps_ahead > 0) == async_scheduling
    assert tokens[0] == tokens[1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90+")
@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_programmatic_dependent_launch_equals_stream_order(model_dir, k, monkeypatch):
    """The decode kernels as programmatic dependent launches (worker.kernels.pdl) give the bits of the
    same kernels in plain stream order: a kernel that read an activation before its wait would read the
    one before it unfinished, and a token, logprob or cache entry would differ."""
    from worker.kernels import pdl

    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("NEXTSERVE_PDL", setting)
        pdl.use_pdl.cache_clear()
        outputs, snapshot, (replays, _), _ = run(model_dir, mixed_params(), dtype="bfloat16", speculative_tokens=k)
        assert replays > 0
        results.append((outputs, snapshot))
    pdl.use_pdl.cache_clear()
    (on, on_caches), (off, off_caches) = results
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.logprobs for o in on] == [o.logprobs for o in off]
    for i, (a, b) in enumerate(zip(on_caches, off_caches)):
        assert torch.equal(a, b), f"cache tensor {i} differs between PDL and stream order"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90+")
@pytest.mark.parametrize("form", ["one", "two"])
@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_gdn_decode_forms_under_pdl_equal_stream_order(model_dir, form, k, monkeypatch):
    """The GDN decode step's one- and two-launch forms read the first value head's state before their PDL
    wait (worker.kernels.triton_gdn_decode): in graphs with PDL they give the bits of the same kernels in
    plain stream order. (Against the three launches they sum in another order: the kernel tests compare.)"""
    from worker.kernels import pdl

    results = []
    with gdn_decode_form(monkeypatch, form):
        for pdl_setting in ("1", "0"):
            monkeypatch.setenv("NEXTSERVE_PDL", pdl_setting)
            pdl.use_pdl.cache_clear()
            outputs, snapshot, (replays, _), _ = run(model_dir, mixed_params(), dtype="bfloat16",
                                                     speculative_tokens=k)
            assert replays > 0
            results.append((outputs, snapshot))
    pdl.use_pdl.cache_clear()
    (on, on_caches), (off, off_caches) = results
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.logprobs for o in on] == [o.logprobs for o in off]
    for i, (a, b) in enumerate(zip(on_caches, off_caches)):
        assert torch.equal(a, b), f"cache tensor {i} differs between PDL and stream order"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
def test_known_tokens_drafted_in_the_graph_are_all_accepted(model_dir, k, async_scheduling):
    """A k = 0 run's own tokens as KnownTokensProposer's table: the replayed verify steps draft them
    (no host drafting), accept every one, and emit k = 0's tokens (fp32)."""
    max_tokens, common = 24, dict(device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8, max_model_len=512)
    with LLM(model_dir, **common) as llm:
        reference = [o.token_ids for o in llm.generate(PROMPTS, greedy(max_tokens + k + 2), use_tqdm=False)]
    torch.cuda.empty_cache()
    known = {f"r{i}": p + r for i, (p, r) in enumerate(zip(PROMPTS, reference))}
    proposer = KnownTokensProposer(known, k, 8, 512, "cuda")
    with LLM(model_dir, speculative_tokens=k, proposer=proposer, async_scheduling=async_scheduling, **common) as llm:
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, greedy(max_tokens))
        finished = {}
        while engine.has_unfinished:
            finished.update({out.request_id: out for out in engine.step() if out.finished})
        graphs = engine.worker.decode_graphs
        replays, eager_steps, ahead = graphs.num_replays, graphs.num_eager_steps, engine.num_steps_ahead
    torch.cuda.empty_cache()
    outputs = [finished[f"r{i}"] for i in range(len(PROMPTS))]
    assert [o.token_ids for o in outputs] == [r[:max_tokens] for r in reference]
    assert all(o.num_drafted_tokens > 0 and o.num_accepted_tokens == o.num_drafted_tokens for o in outputs)
    assert replays > 0 and eager_steps == 0
    assert (ahead > 0) == async_scheduling
