"""The decode path on static buffers, on the CPU (the same code the CUDA graphs hold)."""

import pytest
import torch

from tests.engine_helpers import make_prompts
from worker import LLM, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.decode_graphs import batch_buckets


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(65)[-1] == 72


def test_cuda_graph_sizes_choose_the_buckets(checkpoint_factory):
    """Only the sizes asked for (as vLLM's --cuda-graph-sizes): a batch above the largest takes the general path."""
    from worker.server.main import parse_args

    assert parse_args(["--cuda-graph-sizes", "8,1"]).cuda_graph_sizes == (8, 1)
    with pytest.raises(SystemExit):
        parse_args(["--cuda-graph-sizes", "1,x"])
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        EngineConfig(model="unused", cuda_graph_sizes=(0, 4))
    sizes = EngineConfig(model="unused", cuda_graph_sizes=(4, 2, 2, 64)).cuda_graph_sizes
    assert sizes == (2, 4, 64)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM(checkpoint_factory("tiny"), max_num_seqs=8, cuda_graph_sizes=sizes, cache_memory_bytes=32 << 20) as llm:
        graphs = llm.engine.worker.decode_graphs
        assert graphs.buckets == [2, 4] and graphs.max_batch == 4
        llm.generate(make_prompts([5, 9, 13, 7, 6], seed=3), params, use_tqdm=False)
        assert graphs.num_eager_steps == 0, "5 sequences are above the largest size"
        llm.generate(make_prompts([5, 9, 13], seed=3), params, use_tqdm=False)
        assert graphs.num_eager_steps == 3, "3 sequences pad up to 4"


def caches(llm: LLM) -> list[torch.Tensor]:
    model = llm.engine.model
    tensors = [t for layer in model.attention_layers() for t in (layer.k_cache, layer.v_cache)]
    return tensors + [t for layer in model.gdn_layers() for t in (layer.conv_states, layer.ssm_states)]


def test_decode_steps_take_the_static_path_and_padding_writes_nothing(checkpoint_factory):
    prompts = make_prompts([5, 9, 13], seed=3)  # 3 sequences: bucket 4, one padded row
    with LLM(checkpoint_factory("tiny"), speculative_tokens=2, max_num_seqs=4, cache_memory_bytes=32 << 20) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True), use_tqdm=False)
        graphs = llm.engine.worker.decode_graphs
        assert graphs.num_eager_steps > 0 and graphs.num_replays == 0
        steps = graphs.num_eager_steps
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, repetition_penalty=1.2), use_tqdm=False)
        assert graphs.num_eager_steps == steps, "a request with penalties must take the general path"
        before = [t.clone() for t in caches(llm)]
        graphs._write_padding()
        with torch.inference_mode():
            for greedy_only in (True, False):
                for with_logprobs in (False, True):
                    graphs.step(graphs.max_batch, greedy_only, with_logprobs)
        assert all(torch.equal(a, b) for a, b in zip(before, caches(llm)))


@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_logprobs_on_the_static_path_equal_the_general_paths(checkpoint_factory, k):
    """Four sequences fill bucket 4 (no padding), so both paths run the same shapes: the same bits."""
    prompts = make_prompts([5, 9, 13, 7], seed=8)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=n) for n in (0, 2, 5, None)]
    results = []
    for static in (True, False):
        with LLM(checkpoint_factory("tiny"), speculative_tokens=k, max_num_seqs=4, cache_memory_bytes=32 << 20) as llm:
            graphs = llm.engine.worker.decode_graphs
            if not static:
                llm.engine.runner.decode_graphs = None
            outputs = llm.generate(prompts, params, use_tqdm=False)
            assert (graphs.num_eager_steps > 0) == static
            results.append([(o.token_ids, o.logprobs) for o in outputs])
    assert results[0] == results[1]
    assert len(results[0][2][1][0][1]) == 5 and results[0][3][1] is None


@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_async_scheduling_gives_the_same_outputs_and_frees_everything(checkpoint_factory, k):
    """Steps launched before the previous tokens are known: same tokens and acceptance (greedy and seeded
    sampling), sequences that stop mid-flight dropped cleanly, every block and slot group free at the end."""
    model_dir = checkpoint_factory("tiny")
    prompts = make_prompts([5, 9, 13, 7], seed=4)
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.9, seed=5),
              SamplingParams(max_tokens=7, temperature=0.0),
              SamplingParams(max_tokens=16, temperature=1.0, top_k=8, seed=6, stop_token_ids=[3, 17, 40])]
    results = []
    for async_scheduling in (False, True):
        with LLM(model_dir, max_num_seqs=4, cache_memory_bytes=32 << 20, speculative_tokens=k,
                 async_scheduling=async_scheduling) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            stats, ahead = llm.engine.stats(), llm.engine.num_steps_ahead
        assert stats["num_free_blocks"] == stats["num_blocks"]
        assert stats["num_free_state_groups"] == stats["num_state_groups"]
        results.append(([o.token_ids for o in outputs], [o.finish_reason for o in outputs],
                        [o.num_accepted_tokens for o in outputs], ahead))
    assert results[0][:3] == results[1][:3]
    assert results[0][3] == 0 and results[1][3] > 0


@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_async_scheduling_survives_aborts_and_new_arrivals(checkpoint_factory, k):
    """An abort while a step planned ahead is in flight, and a request arriving mid-run: both sides of
    the in-flight step settle, and the pools end full."""
    with LLM(checkpoint_factory("tiny"), max_num_seqs=4, cache_memory_bytes=32 << 20, speculative_tokens=k,
             async_scheduling=True) as llm:
        engine = llm.engine
        prompts = make_prompts([6, 11, 4], seed=9)
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts[:2]):
            engine.add_request(f"a{i}", prompt, params)
        finished = {}
        for step in range(60):
            if step == 5:
                engine.abort("a0")
            if step == 8:
                engine.add_request("late", prompts[2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            if not engine.has_unfinished:
                break
        assert finished["a0"].finish_reason == "abort"
        assert len(finished["a1"].token_ids) == 30 and len(finished["late"].token_ids) == 5
        assert engine.num_steps_ahead > 0
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
        assert stats["num_free_state_groups"] == stats["num_state_groups"]


@pytest.mark.parametrize("k", [0, 2], ids=["k0", "k2"])
def test_async_scheduling_after_min_tokens_masking(checkpoint_factory, k):
    """min_tokens' masked steps run eagerly. The last of them already allows the next step to be planned
    ahead, but an eager step leaves nothing on the device to continue from: the step after it must be
    planned normally (it raised "a step planned ahead must follow, and be, a step of the decode graphs")."""
    prompts = make_prompts([7, 12], seed=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, min_tokens=5, stop_token_ids=[3])
    results = []
    for async_scheduling in (False, True):
        with LLM(checkpoint_factory("tiny"), max_num_seqs=4, cache_memory_bytes=32 << 20, speculative_tokens=k,
                 async_scheduling=async_scheduling) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            stats, ahead = llm.engine.stats(), llm.engine.num_steps_ahead
        assert stats["num_free_blocks"] == stats["num_blocks"]
        assert stats["num_free_state_groups"] == stats["num_state_groups"]
        results.append(([o.token_ids for o in outputs], ahead))
    assert results[0][0] == results[1][0]
    assert all(len(tokens) >= 5 for tokens in results[1][0])
    assert results[1][1] > 0, "once masking ends, steps are planned ahead"


def test_a_step_planned_ahead_continues_from_the_accepted_drafts():
    """The inputs of the step after a verify step, set on the device: the token after the accepted drafts,
    then the new drafts; the start num_accepted + 1 further on; the state slot after the last accepted."""
    from types import SimpleNamespace

    from worker.engine.decode_graphs import DecodeGraphs, DecodeResult

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=100))
    graphs = DecodeGraphs(model, None, num_spec_tokens=2, block_size=16, max_num_seqs=4, max_model_len=64,
                          device=torch.device("cpu"))
    previous = DecodeResult(
        token_ids=torch.tensor([[5, 6, 7], [8, -1, -1], [9, 10, -1]]), num_accepted=torch.tensor([2, 0, 1]),
        drafts=torch.tensor([[11, 12], [13, 14], [15, 16]]), ctx=None, input_ids=None,
        positions=torch.tensor([20, 21, 22, 3, 4, 5, 40, 41, 42]), hidden_states=None)
    graphs._continue_from(previous, 3)
    assert graphs.ints[:9].tolist() == [7, 11, 12, 8, 13, 14, 10, 15, 16]
    assert graphs._field("start", 3).tolist() == [23, 4, 42]
    assert graphs._field("accepted", 3).tolist() == [3, 1, 2]
