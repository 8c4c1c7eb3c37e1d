"""The FP8 fused MoE: the Triton kernels against the torch reference (outputs NaN-poisoned).

Experts are quantised by b x b blocks with partial blocks in H; the shared expert is the last
expert slot, as the model stacks it. The kernels sum in float32 and hold SwiGLU's output in float32
before rounding it to e4m3, where the reference sums in float64: compared by relative error.
"""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import LaunchSpy, assert_rel_close, generator, randn
from tests.kernels.test_moe import routing
from worker.kernels.fp8.quant import quantize_block_fp8
from worker.kernels.moe.fp8_reference import fused_moe_fp8

tk = pytest.importorskip("worker.kernels.moe.triton_fp8", reason="triton is not installed")
fp8_triton = importlib.import_module("worker.kernels.fp8.triton")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def experts(num, hidden, inter, block, gen, device):
    w13, w13_s = quantize_block_fp8(randn(num, 2 * inter, hidden, gen=gen, device=device, scale=hidden ** -0.5), block)
    w2, w2_s = quantize_block_fp8(randn(num, hidden, inter, gen=gen, device=device, scale=inter ** -0.5), block)
    return dict(w13=w13, w2=w2, w13_scale_inv=w13_s, w2_scale_inv=w2_s)


def check(tokens, routed, top_k, hidden, inter, block, dtype, device, tol, config=None):
    gen = generator(tokens + routed, device)
    weights = experts(routed + 1, hidden, inter, block, gen, device)
    topk_weights, topk_ids = routing(tokens, routed, top_k, gen, device)
    x = randn(tokens, hidden, gen=gen, device=device, dtype=dtype)
    args = dict(hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids, block=block, **weights)
    assert_rel_close(tk.fused_moe_fp8(**args, config=config), fused_moe_fp8(**args), tol, "moe output")


@pytest.mark.parametrize("tokens,routed,top_k", [(1, 4, 2), (7, 6, 2), (33, 5, 3)], ids=str)
def test_fused_moe_fp8_matches_the_reference(tokens, routed, top_k, device):
    check(tokens, routed, top_k, hidden=96, inter=64, block=32, dtype=torch.float32, device=device, tol=2e-3,
          config=tk.DEFAULT_CONFIG)


@pytest.mark.parametrize("gate_up_n,nb,down_n", [(8, 1, 8), (32, 2, 4), (8, 4, 16)], ids=str)
@pytest.mark.parametrize("tokens", [1, 3])
def test_fp8_decode_path_matches_the_reference(tokens, gate_up_n, nb, down_n, device):
    """The pair-by-pair path: its own activation quantisation per group, a partial last block in H (80 = 2.5
    blocks of 32), K walked NB blocks at a time past the end, N tiles narrower than a block."""
    config = {"path": "pairs", "gate_up": dict(BLOCK_N=gate_up_n, NB=nb, num_warps=2),
              "down": dict(BLOCK_N=down_n, num_warps=2)}
    check(tokens, 5, 3, hidden=80, inter=64, block=32, dtype=torch.float32, device=device, tol=2e-3, config=config)


@pytest.mark.parametrize("down_nb", [1, 2], ids=["down-nb1", "down-whole-k"])
@pytest.mark.parametrize("stage", ["gate_up", "down"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fp8_decode_path_prequantised_activations_give_the_same_bits(tokens, stage, down_nb, device):
    """`"prequant"`: a stage's activations (the token's features for gate_up, the intermediate rows for
    down) quantised by one per_token_group_quant_fp8 launch, the same rounding as the stage's programs'
    own, so the output is bit-identical."""
    gen = generator(11, device)
    weights = experts(6, 80, 64, 32, gen, device)
    topk_weights, topk_ids = routing(tokens, 5, 3, gen, device)
    x = randn(tokens, 80, gen=gen, device=device)
    outs = []
    for prequant in (False, True):
        config = {"path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2),
                  "down": dict(BLOCK_N=8, NB=down_nb, num_warps=2)}
        config[stage]["prequant"] = prequant
        outs.append(tk.fused_moe_fp8(x, topk_weights=topk_weights, topk_ids=topk_ids, block=32, config=config,
                                     **weights))
    assert torch.equal(outs[0], outs[1])


def test_fp8_down_stage_whole_k_agrees_with_block_by_block(device):
    """The down stage loading all of K at once (NB = I / b) sums the blocks in another order: fp32 rounding apart."""
    gen = generator(13, device)
    weights = experts(6, 80, 64, 32, gen, device)
    topk_weights, topk_ids = routing(2, 5, 3, gen, device)
    x = randn(2, 80, gen=gen, device=device)
    outs = [tk.fused_moe_fp8(x, topk_weights=topk_weights, topk_ids=topk_ids, block=32, **weights, config={
        "path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2), "down": dict(BLOCK_N=8, NB=nb, num_warps=2)})
        for nb in (1, 2)]
    assert_rel_close(outs[1], outs[0], 1e-5, "whole-K down")
    with pytest.raises(ValueError, match="must divide"):
        tk.fused_moe_fp8(x, topk_weights=topk_weights, topk_ids=topk_ids, block=32, **weights, config={
            "path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2), "down": dict(BLOCK_N=8, NB=4)})


@pytest.mark.parametrize("down_n", [4, 8])
@pytest.mark.parametrize("tokens", [1, 3])
def test_packed_down_stage_matches_the_reference(tokens, down_n, device, monkeypatch):
    """`"packed"`: the down stage's e4m3 weights and intermediate rows read as 32-bit words, four values each,
    the slots summed one by one (84 rows: a partial last tile of 8)."""
    decode_fp8 = importlib.import_module("worker.kernels.moe.decode_fp8")
    spy = LaunchSpy(decode_fp8._down_fp8_packed_kernel)
    monkeypatch.setattr(decode_fp8, "_down_fp8_packed_kernel", spy)
    config = {"path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2, prequant=True),
              "down": dict(BLOCK_N=down_n, num_warps=2, prequant=True, packed=True)}
    check(tokens, 5, 3, hidden=84, inter=64, block=32, dtype=torch.float32, device=device, tol=2e-3, config=config)
    assert spy.grids == [(tokens, -(-84 // down_n))]


def test_packed_down_stage_needs_prequantised_rows(device):
    config = {"path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2), "down": dict(BLOCK_N=8, packed=True)}
    with pytest.raises(ValueError, match="prequant"):
        check(1, 5, 3, hidden=64, inter=64, block=32, dtype=torch.float32, device=device, tol=2e-3, config=config)


@pytest.mark.parametrize("path", ["pairs", "grouped"])
def test_fp8_moe_reads_groups_quantised_already(path, device):
    """x_groups (a norm's e4m3 groups of the tokens) stand in for the MoE's own quantisation of them."""
    gen = generator(12, device)
    weights = experts(6, 80, 64, 32, gen, device)
    topk_weights, topk_ids = routing(3, 5, 3, gen, device)
    x = randn(3, 80, gen=gen, device=device)
    config = ({"path": "pairs", "gate_up": dict(BLOCK_N=8, NB=2, num_warps=2), "down": dict(BLOCK_N=8, num_warps=2)}
              if path == "pairs" else tk.DEFAULT_CONFIG)
    args = dict(topk_weights=topk_weights, topk_ids=topk_ids, block=32, config=config, **weights)
    groups = tk.per_token_group_quant_fp8(x, 32)
    assert torch.equal(tk.fused_moe_fp8(x, **args), tk.fused_moe_fp8(x, **args, x_groups=groups))


def test_bad_scales_are_refused(device):
    weights = experts(3, 64, 32, 32, generator(0, device), device)
    weights["w2_scale_inv"] = weights["w2_scale_inv"][:, :1]
    with pytest.raises(ValueError, match="w2_scale_inv must be"):
        tk.fused_moe_fp8(torch.zeros(1, 64, device=device), topk_weights=torch.ones(1, 1, device=device),
                         topk_ids=torch.zeros(1, 1, dtype=torch.int32, device=device), block=32, **weights)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("inter", [512, 256, 128], ids=["tp1", "tp2", "tp4"])
def test_fused_moe_fp8_real_shapes(tokens, inter, device):
    """Qwen3-Next-80B's shape per tensor-parallel rank, 64 of its 512 routed experts (the kernel reads only
    the experts it is sent to), top-10 + the shared expert."""
    check(tokens, 64, 10, hidden=2048, inter=inter, block=128, dtype=torch.bfloat16, device=device, tol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("down_n", [4, 8])
def test_packed_down_stage_real_shapes(down_n, device):
    config = {"path": "pairs", "gate_up": dict(BLOCK_N=2, NB=16, num_warps=4, prequant=True),
              "down": dict(BLOCK_N=down_n, NB=4, num_warps=4, prequant=True, packed=True)}
    check(1, 64, 10, hidden=2048, inter=512, block=128, dtype=torch.bfloat16, device=device, tol=1e-2, config=config)
