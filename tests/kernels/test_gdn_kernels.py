"""Gated delta rule: Triton kernels against the torch references.

State pools are NaN wherever the kernel must write (and wherever a fresh sequence must not read);
every other slot, PAD groups' included, must come back bit for bit. CPU runs use Triton's
interpreter at small shapes; the `gpu` tests use Qwen3-Next-80B per-rank shapes.
"""

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import (PAD, assert_rel_close, assert_unchanged, cu_seqlens, gdn_inputs, generator, randn,
                                   refused_split_build, tolerance)
from worker.kernels import gated_delta_rule as ref

tk = pytest.importorskip("worker.kernels.triton_gated_delta_rule", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TP_SHAPES = [pytest.param((16 // tp, 32 // tp), id=f"tp{tp}") for tp in (1, 2, 4)]  # (key heads, value heads)


def split_views(q, k, v):
    """q, k, v as strided views of one packed row, the way the GDN layer passes them."""
    lead = q.shape[:-2]
    packed = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
    q2, k2, v2 = packed.split([q.shape[-2] * q.shape[-1], k.shape[-2] * k.shape[-1], v.shape[-2] * v.shape[-1]], dim=-1)
    return (q2.view(*lead, *q.shape[-2:]), k2.view(*lead, *k.shape[-2:]), v2.view(*lead, *v.shape[-2:]))


# ---------------------------------------------------------------- chunked prefill


def check_chunk(seqs, nk, nv, dk, dv, dtype, device, seed, slots=3, views=False, launcher_args=None, **kwargs):
    """seqs: (length, group or PAD, num_accepted, has_initial_state) per sequence."""
    gen = generator(seed, device)
    lengths = [s[0] for s in seqs]
    q, k, v, g, beta = gdn_inputs((sum(lengths),), nk, nv, dk, dv, gen, device, dtype)
    if views:
        q, k, v = split_views(q, k, v)
    num_groups = max([s[1] for s in seqs] + [0]) + 2  # the last group belongs to nobody
    states = randn(num_groups, slots, nv, dk, dv, gen=gen, device=device, scale=0.5)
    written = torch.zeros(states.shape[:2], dtype=torch.bool)
    for length, group, accepted, has_init in seqs:
        if group == PAD or length == 0:
            continue
        if not has_init:
            states[group] = float("nan")  # a fresh sequence must not read its group
        elif accepted != 1:
            states[group, 0] = float("nan")
        written[group, 0] = True
    args = dict(q=q, k=k, v=v, g=g, beta=beta, cu_seqlens=cu_seqlens(lengths, device),
                state_indices=torch.tensor([s[1] for s in seqs], device=device),
                num_accepted=torch.tensor([s[2] for s in seqs], device=device),
                has_initial_state=torch.tensor([s[3] for s in seqs], device=device), **kwargs)
    before, expected_states = states.clone(), states.clone()
    expected = ref.chunk_gated_delta_rule(ssm_states=expected_states, **args)
    if launcher_args is None:
        out = tk.chunk_gated_delta_rule(ssm_states=states, **args)
    else:
        scale, l2 = args.pop("scale", None), args.pop("use_qk_l2norm", True)
        out = tk._chunk_gated_delta_rule_fwd(ssm_states=states, scale=dk ** -0.5 if scale is None else scale,
                                             use_qk_l2norm=l2, **args, **launcher_args)
    tol = tolerance(dtype)
    assert_rel_close(out, expected, tol, "output")
    written = written.to(device)
    assert_rel_close(states[written], expected_states[written], tol, "final states (slot 0)")
    assert_unchanged(states[~written], before[~written], "slots the kernel must not write")


HEADS = [pytest.param((2, 2), id="nv=nk"), pytest.param((1, 2), id="nv=2nk")]
CHUNK_CASES = [
    pytest.param([(63, 3, 1, False)], id="63-fresh"),
    pytest.param([(65, 1, 3, True)], id="65-from-slot2"),
    pytest.param([(1, 4, 3, True), (63, 0, 1, False), (130, 2, 1, True), (5, PAD, 1, True), (7, 1, 2, True)],
                 id="packed-1-63-130-pad-7"),
    pytest.param([(3, 0, 2, True), (0, 1, 1, True), (64, 2, 1, False)], id="empty-sequence"),
]


OUTPUT_MODES = [pytest.param(False, id="output-kernel"), pytest.param(True, id="fused-output")]


PREPARE_PATHS = [pytest.param(True, id="split-prepare"), pytest.param(False, id="one-launch-prepare")]


@pytest.mark.parametrize("split", PREPARE_PATHS)
@pytest.mark.parametrize("fused", OUTPUT_MODES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seqs", CHUNK_CASES)
def test_chunk_gated_delta_rule(seqs, heads, fused, split, device):
    with refused_split_build(split, device):
        check_chunk(seqs, *heads, dk=16, dv=24, dtype=torch.float32, device=device, seed=len(seqs),
                    launcher_args=dict(fused_output=fused, split_prepare=split))


def test_chunk_gated_delta_rule_default_launch(device):
    check_chunk(CHUNK_CASES[2].values[0], 1, 2, dk=16, dv=24, dtype=torch.float32, device=device, seed=7)


def test_chunk_gated_delta_rule_strided_views_dk_ne_dv(device):
    check_chunk([(70, 1, 1, True), (20, 0, 2, True)], 2, 4, dk=32, dv=16, dtype=torch.float32, device=device,
                seed=3, views=True)


def test_chunk_gated_delta_rule_scale_and_no_l2norm(device):
    check_chunk([(40, 0, 1, True)], 1, 1, dk=16, dv=16, dtype=torch.float32, device=device, seed=4,
                scale=0.3, use_qk_l2norm=False)


@pytest.mark.parametrize("split", PREPARE_PATHS)
@pytest.mark.parametrize("fused", OUTPUT_MODES)
def test_chunk_gated_delta_rule_several_v_tiles(fused, split, device):
    with refused_split_build(split, device):
        check_chunk([(50, 0, 2, True), (17, 1, 1, False)], 1, 2, dk=16, dv=40, dtype=torch.float32, device=device,
                    seed=5, launcher_args=dict(BV=16, fused_output=fused, split_prepare=split))


def test_chunk_gated_delta_rule_rejects_unpipelined_launch(device):
    with pytest.raises(ValueError, match="num_stages"):
        check_chunk([(20, 0, 1, True)], 1, 1, dk=16, dv=16, dtype=torch.float32, device=device, seed=0,
                    launcher_args=dict(num_stages=1))


# ---------------------------------------------------------------- decode / verify


def check_recurrent(k_spec, nk, nv, dk, dv, dtype, device, seed, extra_rows=0, views=False, launcher_args=None):
    """A batch holding every num_accepted in 1..1+k (plus extra_rows random ones) and a PAD row."""
    q_len = 1 + k_spec
    gen = generator(seed, device)
    accepted = list(range(1, q_len + 1)) + torch.randint(1, q_len + 1, (extra_rows,), generator=gen,
                                                         device=device).tolist()
    rows = len(accepted)
    groups = torch.randperm(rows + 1, generator=gen, device=device)[:rows].tolist()  # one group is nobody's
    q, k, v, g, beta = gdn_inputs((rows + 1, q_len), nk, nv, dk, dv, gen, device, dtype)
    if views:
        q, k, v = split_views(q, k, v)
    states = randn(rows + 1, q_len, nv, dk, dv, gen=gen, device=device, scale=0.5)
    written = torch.zeros(states.shape[:2], dtype=torch.bool)
    for group, a in zip(groups, accepted):
        read = states[group, a - 1].clone()
        states[group] = float("nan")  # every slot is written; only slot a-1 is read first
        states[group, a - 1] = read
        written[group] = True
    pad_row = rows // 2
    args = dict(q=q, k=k, v=v, g=g, beta=beta,
                state_indices=torch.tensor(groups[:pad_row] + [PAD] + groups[pad_row:], device=device),
                num_accepted=torch.tensor(accepted[:pad_row] + [1] + accepted[pad_row:], device=device))
    before, expected_states = states.clone(), states.clone()
    expected = ref.fused_recurrent_gated_delta_rule(ssm_states=expected_states, **args)
    if launcher_args is None:
        out = tk.fused_recurrent_gated_delta_rule(ssm_states=states, **args)
    else:
        out = tk._fused_recurrent_gated_delta_rule_fwd(ssm_states=states, scale=dk ** -0.5, use_qk_l2norm=True,
                                                       **args, **launcher_args)
    tol = tolerance(dtype)
    assert_rel_close(out, expected, tol, "output")
    written = written.to(device)
    assert_rel_close(states[written], expected_states[written], tol, "states after each position")
    assert_unchanged(states[~written], before[~written], "slots the kernel must not write")


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("k_spec", range(4), ids=lambda k: f"k{k}")
def test_fused_recurrent_gated_delta_rule(k_spec, heads, device):
    check_recurrent(k_spec, *heads, dk=16, dv=24, dtype=torch.float32, device=device, seed=k_spec)


def test_fused_recurrent_strided_views_several_v_tiles(device):
    check_recurrent(2, 2, 4, dk=32, dv=40, dtype=torch.float32, device=device, seed=9, extra_rows=3, views=True,
                    launcher_args=dict(BV=8))


# ---------------------------------------------------------------- gating and argument checks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gdn_gating(dtype, device):
    gen = generator(0, device)
    ab = randn(37, 2, 6, gen=gen, device=device, dtype=dtype, scale=8.0)  # reaches softplus' linear branch
    a, b = ab[:, 0], ab[:, 1]  # strided, as the layer's split gives them
    A_log, dt_bias = randn(6, gen=gen, device=device), randn(6, gen=gen, device=device)
    g, beta = tk.gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    g_ref, beta_ref = ref.gdn_gating(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beta, beta_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_gating_recurrent(dtype, device):
    """Gating in the recurrent kernel: the same bits as the gating kernel then the recurrent one, and
    the reference's values; a and b strided, as the layer's projection gives them."""
    gen = generator(4, device)
    q, k, v, _, _ = gdn_inputs((3, 2), 2, 4, 16, 16, gen, device, dtype)
    ab = randn(3, 2, 2, 4, gen=gen, device=device, dtype=dtype, scale=4.0)
    a, b = ab[:, :, 0], ab[:, :, 1]
    A_log, dt_bias = randn(4, gen=gen, device=device), randn(4, gen=gen, device=device)
    states = randn(3, 2, 4, 16, 16, gen=gen, device=device, scale=0.5)
    idx = torch.tensor([2, PAD, 0], device=device)
    accepted = torch.tensor([1, 1, 2], device=device)
    fused_states, split_states, ref_states = states.clone(), states.clone(), states.clone()
    fused = tk.fused_gating_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, fused_states, idx, accepted)
    g, beta = tk.gdn_gating(a.reshape(6, 4), b.reshape(6, 4), A_log, dt_bias)
    split = tk.fused_recurrent_gated_delta_rule(q, k, v, g.view(3, 2, 4), beta.view(3, 2, 4), split_states, idx,
                                                accepted)
    assert torch.equal(fused, split) and torch.equal(fused_states, split_states)
    expected = ref.fused_gating_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, ref_states, idx, accepted)
    assert_rel_close(fused, expected, tolerance(dtype), "output")
    assert_rel_close(fused_states, ref_states, tolerance(dtype), "states")


def test_shape_errors_name_the_argument(device):
    gen = generator(0, device)
    q, k, v, g, beta = gdn_inputs((2, 1), 2, 3, 16, 16, gen, device)
    states = torch.zeros(2, 1, 3, 16, 16, device=device)
    idx = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="v must be"):
        tk.fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, ssm_states=states, state_indices=idx,
                                            num_accepted=idx + 1)


# ---------------------------------------------------------------- GPU, Qwen3-Next-80B per-rank shapes

RAGGED = [1, 63, 500, 1000, 4097]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("init", [True, False], ids=["with-initial-state", "fresh"])
@pytest.mark.parametrize("heads", TP_SHAPES)
@pytest.mark.gpu
@needs_cuda
def test_chunk_gated_delta_rule_gpu(heads, init, dtype):
    if dtype == torch.float32 and heads[1] != 8:
        pytest.skip("fp32 is checked at one shape")
    seqs = [(1, 5, 3, init), (63, 0, 1, init), (9, PAD, 1, True), (500, 3, 2, init), (1000, 1, 1, init),
            (4097, 2, 3, init)]
    check_chunk(seqs, *heads, dk=128, dv=128, dtype=dtype, device="cuda", seed=11, views=True)


LAUNCHES = [dict(fused_output=True, BV=64), dict(fused_output=False, BV=32, num_stages=3),
            dict(fused_output=True, BV=32), dict(fused_output=True, BV=64, num_warps=8, num_stages=3),
            dict(fused_output=False, BV=16), dict(fused_output=False, BV=64, num_warps=8),
            dict(fused_output=False, BV=32, solve_warps=4, wy_warps=4),
            dict(fused_output=True, BV=64, solve_warps=8, wy_warps=4, num_stages=3),
            dict(fused_output=True, BV=64, split_prepare=False), dict(fused_output=False, BV=32, split_prepare=False)]


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.gpu
@needs_cuda
def test_chunk_gated_delta_rule_gpu_launches(launch):
    """Both output modes and the tiles and pipelining depths the benchmark sweeps, tp 2 shapes, bf16."""
    seqs = [(1, 5, 3, True), (63, 0, 1, False), (9, PAD, 1, True), (500, 3, 2, True), (1000, 1, 1, True),
            (4097, 2, 3, True)]
    check_chunk(seqs, 8, 16, dk=128, dv=128, dtype=torch.bfloat16, device="cuda", seed=12, views=True,
                launcher_args=launch)


@pytest.mark.parametrize("k_spec", range(5), ids=lambda k: f"k{k}")
@pytest.mark.parametrize("heads", TP_SHAPES)
@pytest.mark.gpu
@needs_cuda
def test_fused_recurrent_gated_delta_rule_gpu(heads, k_spec):
    check_recurrent(k_spec, *heads, dk=128, dv=128, dtype=torch.bfloat16, device="cuda", seed=20 + k_spec,
                    extra_rows=60, views=True)


@pytest.mark.gpu
@needs_cuda
def test_kernels_capture_in_cuda_graph():
    """Decode, verify and prefill launches replay from a CUDA graph: nothing in them waits on the host."""
    device, dtype, nk, nv, d = "cuda", torch.bfloat16, 4, 8, 128
    gen = generator(0, device)
    q, k, v, g, beta = gdn_inputs((6, 3), nk, nv, d, d, gen, device, dtype)
    states = randn(6, 3, nv, d, d, gen=gen, device=device, scale=0.5)
    idx = torch.tensor([4, 0, PAD, 2, 1, 5], device=device)
    accepted = torch.ones(6, dtype=torch.long, device=device)
    lengths = [5, 64, 130]
    pq, pk, pv, pg, pbeta = gdn_inputs((sum(lengths),), nk, nv, d, d, gen, device, dtype)
    cu, has_init = cu_seqlens(lengths, device), torch.tensor([True, False, True], device=device)
    pstates = randn(3, 3, nv, d, d, gen=gen, device=device, scale=0.5)
    pidx, paccepted = torch.tensor([2, 0, 1], device=device), torch.tensor([3, 1, 2], device=device)
    work, pstates_work = states.clone(), pstates.clone()

    def step():
        out = tk.fused_recurrent_gated_delta_rule(q, k, v, g, beta, work, idx, accepted)
        pout = tk.chunk_gated_delta_rule(pq, pk, pv, pg, pbeta, cu, pstates_work, pidx, paccepted, has_init)
        return out, pout

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, pout = step()
    accepted.copy_(torch.tensor([3, 1, 1, 2, 3, 1], device=device))
    work.copy_(states)
    pstates_work.copy_(pstates)
    graph.replay()
    expected_states = states.clone()
    expected = ref.fused_recurrent_gated_delta_rule(q, k, v, g, beta, expected_states, idx, accepted)
    expected_pstates = pstates.clone()
    pexpected = ref.chunk_gated_delta_rule(pq, pk, pv, pg, pbeta, cu, expected_pstates, pidx, paccepted, has_init)
    assert_rel_close(out, expected, 2e-2, "graph-replayed decode output")
    assert_rel_close(work, expected_states, 2e-2, "graph-replayed decode states")
    assert_rel_close(pout, pexpected, 2e-2, "graph-replayed prefill output")
    assert_rel_close(pstates_work, expected_pstates, 2e-2, "graph-replayed prefill states")
