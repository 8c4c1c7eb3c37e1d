"""Causal conv1d: Triton kernels against the torch references.

Conv-state columns the kernel must write start as NaN, as do fresh sequences' states (never read);
every other column, PAD groups' included, must come back bit for bit.
"""

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import (PAD, assert_rel_close, assert_unchanged, cu_seqlens, generator, randn, tolerance,
                                   verify_batch)
from worker.kernels import causal_conv1d as ref

tk = pytest.importorskip("worker.kernels.triton_causal_conv1d", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
KERNEL = 4


def check_conv_fn(seqs, channels, k_spec, dtype, device, seed, activation="silu"):
    """seqs: (length, group or PAD, num_accepted, has_initial_state) per sequence."""
    gen = generator(seed, device)
    lengths = [s[0] for s in seqs]
    x = randn(sum(lengths), channels, gen=gen, device=device, dtype=dtype)
    weight = randn(channels, KERNEL, gen=gen, device=device, dtype=dtype, scale=0.5)
    num_groups = max([s[1] for s in seqs] + [0]) + 2
    states = randn(num_groups, channels, KERNEL - 1 + k_spec, gen=gen, device=device, dtype=dtype)
    written = torch.zeros(num_groups, KERNEL - 1 + k_spec, dtype=torch.bool)
    for length, group, accepted, has_init in seqs:
        if group == PAD or length == 0:
            continue
        if not has_init:
            states[group] = float("nan")
        written[group, : KERNEL - 1] = True
    args = dict(x=x, weight=weight, cu_seqlens=cu_seqlens(lengths, device),
                state_indices=torch.tensor([s[1] for s in seqs], device=device),
                num_accepted=torch.tensor([s[2] for s in seqs], device=device),
                has_initial_state=torch.tensor([s[3] for s in seqs], device=device), activation=activation)
    before, expected_states = states.clone(), states.clone()
    expected = ref.causal_conv1d_fn(conv_states=expected_states, **args)
    out = tk.causal_conv1d_fn(conv_states=states, **args)
    tol = tolerance(dtype)
    assert_rel_close(out, expected, tol, "output")
    written = written[:, None, :].expand(-1, channels, -1).to(device)
    # The state is a copy of inputs: exact in any dtype.
    assert_unchanged(states[written], expected_states[written], "written state columns")
    assert_unchanged(states[~written], before[~written], "state columns the kernel must not write")


CONV_CASES = [
    pytest.param([(63, 2, 1, False)], 0, id="63-fresh-k0"),
    pytest.param([(1, 3, 2, True), (2, 0, 3, True), (70, 4, 1, True), (9, PAD, 1, True), (130, 1, 3, False)], 2,
                 id="packed-1-2-70-pad-130-k2"),
    pytest.param([(5, 0, 1, True), (0, 1, 2, True), (3, 2, 2, False)], 1, id="empty-sequence-k1"),
]


@pytest.mark.parametrize("seqs,k_spec", CONV_CASES)
def test_causal_conv1d_fn(seqs, k_spec, device):
    check_conv_fn(seqs, channels=80, k_spec=k_spec, dtype=torch.float32, device=device, seed=len(seqs))


def test_causal_conv1d_fn_no_activation(device):
    check_conv_fn([(20, 0, 2, True)], channels=16, k_spec=1, dtype=torch.float32, device=device, seed=7,
                  activation=None)


def check_conv_update(k_spec, channels, dtype, device, seed, extra_rows=0, activation="silu"):
    """A batch holding every num_accepted in 1..1+k (plus extra_rows random ones) and a PAD row."""
    q_len = 1 + k_spec
    gen = generator(seed, device)
    accepted, groups, pad_row = verify_batch(k_spec, extra_rows, gen, device)
    rows = len(accepted)
    x = randn(rows + 1, q_len, channels, gen=gen, device=device, dtype=dtype)
    weight = randn(channels, KERNEL, gen=gen, device=device, dtype=dtype, scale=0.5)
    width = KERNEL - 1 + k_spec
    states = randn(rows + 1, channels, width, gen=gen, device=device, dtype=dtype)
    args = dict(x=x, weight=weight, state_indices=torch.tensor(groups[:pad_row] + [PAD] + groups[pad_row:], device=device),
                num_accepted=torch.tensor(accepted[:pad_row] + [1] + accepted[pad_row:], device=device),
                activation=activation)
    before, expected_states = states.clone(), states.clone()
    expected = ref.causal_conv1d_update(conv_states=expected_states, **args)
    out = tk.causal_conv1d_update(conv_states=states, **args)
    assert_rel_close(out, expected, tolerance(dtype), "output")
    assert_unchanged(states, expected_states, "states (shifted inputs, exact)")
    untouched = [grp for grp in range(rows + 1) if grp not in groups]
    assert_unchanged(states[untouched], before[untouched], "the group nobody owns")


@pytest.mark.parametrize("k_spec", range(4), ids=lambda k: f"k{k}")
def test_causal_conv1d_update(k_spec, device):
    check_conv_update(k_spec, channels=80, dtype=torch.float32, device=device, seed=k_spec)


# ---------------------------------------------------------------- GPU, Qwen3-Next-80B per-rank shapes

TP_CHANNELS = [pytest.param((2 * 16 * 128 + 32 * 128) // tp, id=f"tp{tp}") for tp in (1, 2, 4)]


@pytest.mark.parametrize("init", [True, False], ids=["with-initial-state", "fresh"])
@pytest.mark.parametrize("channels", TP_CHANNELS)
@pytest.mark.gpu
@needs_cuda
def test_causal_conv1d_fn_gpu(channels, init):
    seqs = [(1, 5, 3, init), (63, 0, 1, init), (9, PAD, 1, True), (500, 3, 2, init), (1000, 1, 1, init),
            (4097, 2, 3, init), (2, 4, 2, init)]
    check_conv_fn(seqs, channels=channels, k_spec=2, dtype=torch.bfloat16, device="cuda", seed=3)


@pytest.mark.parametrize("k_spec", range(5), ids=lambda k: f"k{k}")
@pytest.mark.parametrize("channels", TP_CHANNELS)
@pytest.mark.gpu
@needs_cuda
def test_causal_conv1d_update_gpu(channels, k_spec):
    check_conv_update(k_spec, channels=channels, dtype=torch.bfloat16, device="cuda", seed=k_spec, extra_rows=60)
