"""Sparse MoE: the Triton routing, alignment and fused MoE against the torch references.

Router logits are a shuffled ladder of well-separated values, so no two experts of a token are
near a tie and the top-k sets compare exactly; outputs start as NaN (conftest) and index buffers
as a poison value, so an unwritten element shows up.
"""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_rel_close, generator, randn, tolerance

ref = importlib.import_module("worker.kernels.moe.reference")
tk = pytest.importorskip("worker.kernels.moe.triton", reason="triton is not installed")
align = importlib.import_module("worker.kernels.moe.align")
decode = importlib.import_module("worker.kernels.moe.decode")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
POISON = -7


@pytest.fixture(autouse=True)
def poisoned_indices(monkeypatch):
    monkeypatch.setattr(align, "_empty_index",
                        lambda shape, device: torch.full(shape, POISON, dtype=torch.int32, device=device))


def ladder_logits(tokens: int, experts: int, gen, device, step: float = 0.05) -> torch.Tensor:
    """[T, E]: each row a random permutation of 0, step, 2 step, ...: adjacent probabilities differ
    by a factor e^step, far above fp32 rounding."""
    rows = [torch.randperm(experts, generator=gen, device=device) for _ in range(tokens)]
    return torch.stack(rows).float() * step


def routing(tokens, experts, top_k, gen, device, shared=True):
    """Reference routing (weights, ids) with the shared expert as slot top_k (id = experts)."""
    logits = ladder_logits(tokens, experts, gen, device)
    if shared:
        logits = torch.cat([logits, randn(tokens, 1, gen=gen, device=device)], dim=1)
    return ref.select_experts(logits, top_k, renormalize=True, shared_gate=shared)


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-gate"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (7, 9, 4), (63, 17, 1), (40, 64, 10)],
                         ids=lambda v: str(v))
def test_select_experts(tokens, experts, top_k, renormalize, shared, device):
    gen = generator(tokens + experts, device)
    logits = ladder_logits(tokens, experts, gen, device)
    if shared:
        logits = torch.cat([logits, randn(tokens, 1, gen=gen, device=device)], dim=1)
    weights, ids = tk.select_experts(router_logits=logits, top_k=top_k, renormalize=renormalize, shared_gate=shared)
    expected_weights, expected_ids = ref.select_experts(router_logits=logits, top_k=top_k, renormalize=renormalize,
                                                        shared_gate=shared)
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_select_experts_ties_go_to_the_lower_id(device):
    """Equal probabilities (a flat row, and a tie below a clear winner) are taken lowest id first."""
    logits = torch.tensor([[0.0] * 9, [0.0, 1.0, 0.5, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]], device=device)
    weights, ids = tk.select_experts(router_logits=logits, top_k=4, renormalize=False)
    assert ids.tolist() == [[0, 1, 2, 3], [1, 3, 2, 4]]
    assert torch.equal(weights[0], torch.full((4,), 1 / 9, device=device))


@pytest.mark.parametrize("tokens,slots,experts,block_size", [
    (1, 3, 9, 16), (7, 3, 9, 4), (63, 5, 17, 16), (500, 3, 9, 16), (97, 11, 33, 32),
], ids=lambda v: str(v))
def test_moe_align_block_size(tokens, slots, experts, block_size, device):
    """One chunk and several (500 x 3 and 97 x 11 pairs exceed a chunk of 1024)."""
    gen = generator(tokens, device)
    _, ids = routing(tokens, experts - 1, slots - 1, gen, device)
    got = align.moe_align_block_size(topk_ids=ids, num_experts=experts, block_size=block_size)
    expected = ref.moe_align_block_size(topk_ids=ids, num_experts=experts, block_size=block_size)
    for name, a, b in zip(("sorted_ids", "expert_ids", "num_padded"), got, expected):
        assert torch.equal(a, b), f"{name} differs"


def check_fused_moe(tokens, experts, hidden, inter, top_k, dtype, device, seed, config=None):
    gen = generator(seed, device)
    weights, ids = routing(tokens, experts, top_k, gen, device)
    x = randn(tokens, hidden, gen=gen, device=device, dtype=dtype)
    w13 = randn(experts + 1, 2 * inter, hidden, gen=gen, device=device, dtype=dtype, scale=hidden**-0.5)
    w2 = randn(experts + 1, hidden, inter, gen=gen, device=device, dtype=dtype, scale=inter**-0.5)
    args = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    out = tk.fused_moe(**args, config=config)
    expected = ref.fused_moe(**args)
    assert out.dtype == dtype
    assert_rel_close(out, expected, tolerance(dtype), "fused_moe")


def tile_config(block_m: int, block_n: int, block_k: int) -> dict:
    gemm = dict(BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=2, num_warps=4, num_stages=2)
    return {"BLOCK_M": block_m, "gate_up": gemm, "down": gemm}


@pytest.mark.parametrize("tokens", [1, 3, 7, 63, 130])
def test_fused_moe(tokens, device):
    """Odd hidden and intermediate sizes (masked tiles), the shared expert fused as the last slot."""
    check_fused_moe(tokens, experts=8, hidden=80, inter=48, top_k=2, dtype=torch.float32, device=device,
                    seed=tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", [2, 9])
def test_fused_moe_half_precision(tokens, dtype, device):
    """Both paths (2 tokens: the pair GEMVs; 9: the grouped GEMMs) in 16-bit activations and weights."""
    if dtype == torch.bfloat16 and tokens > 2 and not HAS_CUDA:
        pytest.skip("Triton 3.6's interpreter gets tl.dot on bf16 wrong (1e10 off on a 16x16 product); "
                    "the GPU runs cover bf16")
    check_fused_moe(tokens, experts=8, hidden=64, inter=32, top_k=2, dtype=dtype, device=device, seed=tokens)


@pytest.mark.parametrize("block_m,block_n,block_k", [(16, 16, 16), (32, 64, 32), (64, 32, 64)],
                         ids=lambda v: str(v))
def test_fused_moe_tile_configs(block_m, block_n, block_k, device):
    check_fused_moe(37, experts=6, hidden=64, inter=40, top_k=3, dtype=torch.float32, device=device, seed=block_m,
                    config=tile_config(block_m, block_n, block_k))


@pytest.mark.parametrize("launches", ["two", "one"])
@pytest.mark.parametrize("block_n,block_k", [(4, 32), (8, 64), (16, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_moe_pairs_path(tokens, block_n, block_k, launches, device):
    """The decode path: one GEMV per pair, then per token over its slots (masked N and K tails), in two
    launches or in one whose counters are left zero for the next call."""
    gemv = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=2)
    config = {"path": "pairs", "fused": launches == "one", "gate_up": dict(gemv, row_acc=block_n == 8), "down": gemv}
    for seed in (tokens + block_n, tokens + block_n + 100)[:1 + (launches == "one")]:
        check_fused_moe(tokens, experts=6, hidden=72, inter=40, top_k=3, dtype=torch.float32, device=device,
                        seed=seed, config=config)
    if launches == "one":
        assert not decode._token_counters(torch.device(device)).any()


def test_shape_errors_are_clear(device):
    x = torch.zeros(3, 16, device=device)
    w13, w2 = torch.zeros(4, 32, 16, device=device), torch.zeros(4, 16, 15, device=device)
    weights, ids = torch.zeros(3, 2, device=device), torch.zeros(3, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"w2 must be \[4, 16, 16\]"):
        tk.fused_moe(x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        tk.select_experts(torch.zeros(3, 4, device=device), 5, True)


# Qwen3-Next-80B per rank: 512 routed experts + the shared one, hidden 2048, intermediate 512 / tp.
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("inter", [512, 256, 128], ids=["tp1", "tp2", "tp4"])
@pytest.mark.parametrize("tokens", [1, 7, 63, 500, 4097])
def test_fused_moe_real_shapes(tokens, inter, dtype, device):
    check_fused_moe(tokens, experts=512, hidden=2048, inter=inter, top_k=10, dtype=dtype, device=device,
                    seed=tokens + inter)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 64, 4097])
def test_select_and_align_real_shapes(tokens, device):
    gen = generator(tokens, device)
    logits = torch.cat([ladder_logits(tokens, 512, gen, device, step=0.01), randn(tokens, 1, gen=gen, device=device)],
                       dim=1)
    weights, ids = tk.select_experts(logits, 10, True, shared_gate=True)
    expected_weights, expected_ids = ref.select_experts(logits, 10, True, shared_gate=True)
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    for block_size in (16, 64):
        got = align.moe_align_block_size(ids, 513, block_size)
        for a, b in zip(got, ref.moe_align_block_size(ids, 513, block_size)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("form", ["stream-order", "pdl", "one-launch"])
@pytest.mark.parametrize("tokens", [1, 2])
def test_pairs_path_in_cuda_graph(tokens, form, device):
    """The decode path replayed from a CUDA graph gives the eager bits; with the programmatic dependent
    launch (or in the one-launch form) the down tiles start before gate_up ends and must still read its
    finished output. Replays
    over fresh routing and inputs (copied into the captured buffers) so a stale read shows."""
    gen = generator(tokens, device)
    w13 = randn(65, 2 * 512, 2048, gen=gen, device=device, dtype=torch.bfloat16, scale=2048**-0.5)
    w2 = randn(65, 2048, 512, gen=gen, device=device, dtype=torch.bfloat16, scale=512**-0.5)
    config = {"path": "pairs", "pdl": form == "pdl", "fused": form == "one-launch", "gate_up": dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4),
              "down": dict(BLOCK_N=2, BLOCK_K=512, num_warps=4)}
    weights, ids = routing(tokens, 64, 10, gen, device)
    x = randn(tokens, 2048, gen=gen, device=device, dtype=torch.bfloat16)
    ids = ids.to(torch.int32)
    tk.fused_moe(x, w13, w2, weights, ids, config=config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.fused_moe(x, w13, w2, weights, ids, config=config)
    for _ in range(3):
        new_weights, new_ids = routing(tokens, 64, 10, gen, device)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        x.copy_(randn(tokens, 2048, gen=gen, device=device, dtype=torch.bfloat16))
        graph.replay()
        expected = tk.fused_moe(x, w13, w2, weights, ids, config=config)
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert_rel_close(out, ref.fused_moe(x, w13, w2, weights, ids), tolerance(torch.bfloat16), "fused_moe")
