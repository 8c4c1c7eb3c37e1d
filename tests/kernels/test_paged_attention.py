"""Paged attention: Triton kernels against the torch references.

The caches start as NaN everywhere but the cached context of each sequence, so a slot written by
mistake (a PAD token's, or past a sequence's end) shows up, and so does a kernel that reads one.
"""

import importlib

import pytest
import torch

from tests.engine_helpers import gdn_decode_form, greedy, make_llm
from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import PAD, assert_rel_close, assert_unchanged, cu_seqlens, generator, randn, tolerance
from worker import kernels

ref = importlib.import_module("worker.kernels.paged_attention")  # the package shadows it with the dispatcher
tk = pytest.importorskip("worker.kernels.triton_paged_attention", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def paged_inputs(seqs, heads, kv_heads, head_dim, block_size, dtype, device, seed):
    """seqs: (q_len, kv_len) per sequence, the queries being its last q_len positions (kv_len 0: a
    sequence whose queries see nothing). -> caches holding the cached context, the step's keys and
    values with a PAD row before each sequence, their slot mapping, and the attention arguments."""
    gen = generator(seed, device)
    blocks = [-(-kv // block_size) for _, kv in seqs]
    num_blocks = sum(blocks) + 3
    order = torch.randperm(num_blocks, generator=gen, device=device).tolist()  # shuffled block tables
    tables = [[order.pop() for _ in range(nb)] for nb in blocks]
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    slots = []
    for (q_len, kv_len), table in zip(seqs, tables):
        slot = [table[p // block_size] * block_size + p % block_size for p in range(kv_len)]
        cached = slot[: max(kv_len - q_len, 0)]
        k_cache.view(-1, kv_heads, head_dim)[cached] = randn(len(cached), kv_heads, head_dim, gen=gen, device=device,
                                                             dtype=dtype)
        v_cache.view(-1, kv_heads, head_dim)[cached] = randn(len(cached), kv_heads, head_dim, gen=gen, device=device,
                                                             dtype=dtype)
        slots += [PAD] + (slot[len(cached):] if kv_len else [PAD] * q_len)
    num_rows = len(slots)
    cache_args = dict(key=randn(num_rows, kv_heads, head_dim, gen=gen, device=device, dtype=dtype),
                      value=randn(num_rows, kv_heads, head_dim, gen=gen, device=device, dtype=dtype),
                      slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))
    max_blocks = max(blocks + [1])
    attn_args = dict(
        query=randn(sum(q for q, _ in seqs), heads, head_dim, gen=gen, device=device, dtype=dtype),
        cu_seqlens_q=cu_seqlens([q for q, _ in seqs], device),
        context_lens=torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32,
                                  device=device),
        scale=head_dim**-0.5,
    )
    return k_cache, v_cache, cache_args, attn_args


def check_paged_attention(seqs, heads, kv_heads, head_dim, block_size, dtype, device, seed=0, gated=False):
    k_cache, v_cache, cache_args, attn_args = paged_inputs(seqs, heads, kv_heads, head_dim, block_size, dtype, device,
                                                           seed)
    if gated:  # the strided half of a [T, H, 2D] projection, as the model passes it
        query = attn_args["query"]
        both = randn(query.shape[0], heads, 2 * head_dim, gen=generator(seed + 1, device), device=device, dtype=dtype)
        attn_args["output_gate"] = both[..., head_dim:]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ref.reshape_and_cache(k_cache=expected_k, v_cache=expected_v, **cache_args)
    tk.reshape_and_cache(k_cache=k_cache, v_cache=v_cache, **cache_args)
    # A copy: exact in any dtype; NaN slots (PAD rows, spare blocks, block tails) must stay NaN.
    assert_unchanged(k_cache, expected_k, "k_cache")
    assert_unchanged(v_cache, expected_v, "v_cache")

    expected = ref.paged_attention(k_cache=expected_k, v_cache=expected_v, **attn_args)
    out = tk.paged_attention(k_cache=k_cache, v_cache=v_cache, **attn_args)
    assert out.dtype == attn_args["query"].dtype
    assert_rel_close(out, expected, tolerance(dtype), "output")
    start = 0
    for q_len, kv_len in seqs:
        if kv_len == 0:
            assert (out[start : start + q_len] == 0).all(), "a sequence with no keys must give zeros"
        start += q_len


# (q_len, kv_len) per sequence: the step's q_len tokens are the last of kv_len.
CASES = [
    pytest.param([(1, 1), (1, 17), (1, 40), (1, 33)], id="decode"),
    *[pytest.param([(1 + k, 1 + k + c) for c in (0, 9, 31, 48)], id=f"verify-k{k}") for k in range(1, 5)],
    pytest.param([(1, 1), (7, 7), (63, 63), (130, 130)], id="prefill-1-7-63-130"),
    pytest.param([(1, 21), (7, 47), (63, 100), (130, 171)], id="prefill-1-7-63-130-cached"),
    pytest.param([(1, 37), (4, 20), (0, 12), (63, 63), (3, 0), (1, 9), (0, 0)], id="mixed-empty-and-no-keys"),
]


@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("seqs", CASES)
def test_paged_attention(seqs, group, block_size, device):
    check_paged_attention(seqs, heads=2 * group, kv_heads=2, head_dim=32, block_size=block_size,
                          dtype=torch.float32, device=device, seed=len(seqs) + group)


@pytest.mark.parametrize("block_size", [4, 64], ids=lambda b: f"bs{b}")
def test_paged_attention_odd_head_dim_and_block_sizes(block_size, device):
    """Blocks smaller than a key tile (several per tile) and larger ones; D = 48 is not a power of two."""
    check_paged_attention([(1, 50), (5, 70), (63, 63), (9, 9)], heads=6, kv_heads=2, head_dim=48,
                          block_size=block_size, dtype=torch.float32, device=device, seed=block_size)


def test_paged_attention_three_heads_per_kv_head(device):
    """A group that is not a power of two: the padded head rows of the tile must not be stored."""
    check_paged_attention([(1, 30), (3, 20), (40, 45)], heads=6, kv_heads=2, head_dim=32, block_size=16,
                          dtype=torch.float32, device=device, seed=3)


def test_shape_errors_are_clear(device):
    k_cache = torch.zeros(4, 16, 2, 32, device=device)
    args = dict(query=torch.zeros(3, 3, 32, device=device), k_cache=k_cache, v_cache=k_cache,
                cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32, device=device),
                context_lens=torch.tensor([3], dtype=torch.int32, device=device),
                block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device), scale=1.0)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        tk.paged_attention(**args)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        tk.reshape_and_cache(key=torch.zeros(3, 2, 32, device=device), value=torch.zeros(3, 2, 32, device=device),
                             k_cache=k_cache, v_cache=k_cache, slot_mapping=torch.zeros(2, dtype=torch.int64,
                                                                                          device=device))


# Real shapes, for the device run: Qwen3-Next has 16 query heads and 2 KV heads of 256 per layer;
# tensor parallelism splits the query heads and replicates the KV heads past tp = 2.
GPU_CASES = [
    pytest.param([(1, 1), (1, 700), (1, 2049), (1, 33)] * 8, id="decode-32"),
    pytest.param([(4, 4 + c) for c in (0, 100, 1000, 4000)] * 4, id="verify-k3"),
    pytest.param([(1000, 1000), (500, 2500), (63, 63), (1, 300), (4, 90), (0, 5)], id="chunked-prefill-mixed"),
    pytest.param([(1, 20000)], id="decode-1-long"),
    pytest.param([(4097, 4097), (7, 4104), (1, 1)], id="prefill-4097"),
    pytest.param([(3, 9000), (1, 1), (3, 3)], id="verify-k2-split"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads,kv_heads", [(16, 2), (8, 1), (4, 1)], ids=["tp1", "tp2", "tp4"])
@pytest.mark.parametrize("seqs", GPU_CASES)
def test_paged_attention_real_shapes(seqs, heads, kv_heads, dtype, device):
    check_paged_attention(seqs, heads=heads, kv_heads=kv_heads, head_dim=256, block_size=16, dtype=dtype,
                          device=device, seed=heads)


@pytest.fixture
def auto_backend_after():
    yield
    kernels.set_kernel_backend("auto")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU run of the engine; tests/kernels/test_engine_gpu.py covers the GPU")
@pytest.mark.parametrize("k", [0, 2], ids=["no-mtp", "k2"])
def test_engine_greedy_tokens_with_triton_kernels_on_cpu(checkpoint_factory, auto_backend_after, monkeypatch, k):
    """The tiny model through the engine with every Triton kernel (interpreted) forced: decode, verify and a
    chunked prefill (40 tokens in chunks of 32) give the tokens of the torch references."""
    model_dir = checkpoint_factory("tiny", dtype="float32")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 700, (n,), generator=gen).tolist() for n in (1, 17, 40)]
    calls = []
    kernel = tk.paged_attention
    monkeypatch.setattr(tk, "paged_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    def run(backend):
        llm = make_llm(model_dir, device="cpu", kernel_backend=backend, speculative_tokens=k,
                       max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=64)
        return [o.token_ids for o in llm.generate(prompts, greedy(6))]

    expected = run("torch")
    assert not calls
    assert run("triton") == expected
    assert calls, "the engine did not reach the Triton paged attention"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU run of the engine; tests/gpu/test_decode_graphs.py covers the GPU")
@pytest.mark.parametrize("form,k", [("one", 2), ("two", 0)])
def test_engine_greedy_tokens_with_each_gdn_decode_form_on_cpu(checkpoint_factory, auto_backend_after, monkeypatch,
                                                                form, k):
    """The same with the GDN decode step in its other forms (NEXTSERVE_GDN_DECODE), which the interpreter
    computes bit for bit as the three launches: the tokens of the torch references. (Prompts of one prefill
    chunk: the forms are decode kernels, and the chunked prefill is the test above's.)"""
    from worker.kernels import triton_gdn_decode

    model_dir = checkpoint_factory("tiny", dtype="float32")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 700, (n,), generator=gen).tolist() for n in (1, 17)]
    launches = []
    kernel = triton_gdn_decode.gdn_decode_as
    monkeypatch.setattr(triton_gdn_decode, "gdn_decode_as", lambda *a, **kw: launches.append(a[0]) or kernel(*a, **kw))

    def run(backend):
        llm = make_llm(model_dir, device="cpu", kernel_backend=backend, speculative_tokens=k,
                       max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=64)
        return [o.token_ids for o in llm.generate(prompts, greedy(6))]

    with gdn_decode_form(monkeypatch, form):
        expected = run("torch")
        assert run("triton") == expected
    assert launches and set(launches) == {form}


@pytest.mark.parametrize("seqs, gated", [(CASES[0].values[0], True), (CASES[2].values[0], False),
                                         (CASES[-1].values[0], False)], ids=["decode-gated", "prefill", "mixed"])
def test_paged_attention_split_keys(seqs, gated, device, monkeypatch):
    """Keys cut into ranges per chunk (flash-decoding), as decode at small batch runs on a GPU; the
    output gate then applied by the combine kernel."""
    monkeypatch.setattr(tk, "PROGRAMS_PER_SM", 4096)
    monkeypatch.setattr(tk, "MIN_KEYS_PER_SPLIT", 1)
    monkeypatch.setattr(tk, "MAX_SPLITS", 4)  # a few ranges: the interpreter's time grows with the programs
    splits = []
    choose = tk._num_splits
    monkeypatch.setattr(tk, "_num_splits", lambda *a: splits.append(choose(*a)) or splits[-1])
    check_paged_attention(seqs, heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                          device=device, seed=11, gated=gated)
    assert splits and splits[0] > 1


@pytest.mark.parametrize("group_size", [16, 32])
def test_split_keys_write_the_o_projections_e4m3_groups(group_size, device, monkeypatch):
    """quant_block with split keys: the combine kernel also writes the e4m3 groups of each token's H * D
    features (what the FP8 o projection reads, flatten_tokens keeping them), the output unchanged; without
    a split there are none (the projection quantises for itself)."""
    from tests.kernels.test_add_rms_norm import assert_groups_of
    from worker.kernels.fp8.quant import attached_token_groups, flatten_tokens

    monkeypatch.setattr(tk, "PROGRAMS_PER_SM", 4096)
    monkeypatch.setattr(tk, "MIN_KEYS_PER_SPLIT", 1)
    monkeypatch.setattr(tk, "MAX_SPLITS", 4)
    k_cache, v_cache, cache_args, attn_args = paged_inputs(CASES[0].values[0], 4, 2, 32, 16, torch.float32, device, 3)
    both = randn(4, 4, 64, gen=generator(4, device), device=device)
    attn_args["output_gate"] = both[..., 32:]
    tk.reshape_and_cache(k_cache=k_cache, v_cache=v_cache, **cache_args)
    plain = tk.paged_attention(k_cache=k_cache, v_cache=v_cache, **attn_args)
    quantised = tk.paged_attention(k_cache=k_cache, v_cache=v_cache, **attn_args, quant_block=group_size)
    assert torch.equal(quantised, plain)
    assert_groups_of(flatten_tokens(quantised), group_size)
    monkeypatch.setattr(tk, "MAX_SPLITS", 1)
    unsplit = tk.paged_attention(k_cache=k_cache, v_cache=v_cache, **attn_args, quant_block=group_size)
    assert attached_token_groups(unsplit, group_size) is None


def test_paged_attention_output_gate(device):
    """The output times sigmoid(gate), the gate a strided view (split keys: test_paged_attention_split_keys)."""
    check_paged_attention(CASES[-1].values[0], heads=4, kv_heads=2, head_dim=32, block_size=16,
                          dtype=torch.float32, device=device, seed=5, gated=True)
