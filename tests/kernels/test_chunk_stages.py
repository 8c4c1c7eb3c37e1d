"""The stages of the chunked prefill: torch references against the token-by-token reference, and the
Triton prepare kernel against its reference (the whole kernel path is checked in test_gdn_kernels)."""

import pytest
import torch

from tests.kernels.helpers import PAD, assert_rel_close, cu_seqlens, gdn_inputs, generator, randn, refused_split_build
from worker.kernels import gated_delta_rule_chunked as chunks
from worker.kernels import gated_delta_rule as ref

twy = pytest.importorskip("worker.kernels.triton_gated_delta_rule_wy", reason="triton is not installed")

SEQS = [(63, 2, 1, True), (5, PAD, 1, True), (130, 0, 2, False), (1, 1, 3, True)]  # length, group, accepted, init


def batch(seqs, nk, nv, dk, dv, device, seed):
    gen = generator(seed, device)
    q, k, v, g, beta = gdn_inputs((sum(s[0] for s in seqs),), nk, nv, dk, dv, gen, device)
    states = randn(4, 3, nv, dk, dv, gen=gen, device=device, scale=0.5)
    meta = dict(cu_seqlens=cu_seqlens([s[0] for s in seqs], device),
                state_indices=torch.tensor([s[1] for s in seqs], device=device),
                num_accepted=torch.tensor([s[2] for s in seqs], device=device),
                has_initial_state=torch.tensor([s[3] for s in seqs], device=device))
    return q, k, v, g, beta, states, meta


@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "no-l2norm"])
def test_stage_references_equal_token_by_token_reference(l2norm):
    q, k, v, g, beta, states, meta = batch(SEQS, 1, 2, 16, 24, "cpu", seed=1)
    expected_states = states.clone()
    expected = ref.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, ssm_states=expected_states, scale=0.3,
                                          use_qk_l2norm=l2norm, **meta)
    w, u, A, G, ks, qd = chunks.chunk_prepare(q=q, k=k, v=v, g=g, beta=beta, cu_seqlens=meta["cu_seqlens"],
                                              state_indices=meta["state_indices"], scale=0.3, use_qk_l2norm=l2norm)
    h, v_new = chunks.chunk_states(k=k, w=w, u=u, G=G, ks=ks, ssm_states=states, **meta)
    out = chunks.chunk_output(q=q, A=A, qd=qd, h=h, v_new=v_new, cu_seqlens=meta["cu_seqlens"],
                              state_indices=meta["state_indices"])
    assert_rel_close(out, expected, 1e-5, "output")
    assert_rel_close(states, expected_states, 1e-5, "states")


@pytest.mark.parametrize("split", [True, False], ids=["two-launches", "one-launch"])
@pytest.mark.parametrize("lengths", [[63], [500, 1, 1000]], ids=["63", "500-1-1000"])
def test_chunk_prepare_kernels(lengths, split, device):
    seqs = [(n, i, 1, True) for i, n in enumerate(lengths)] + [(7, PAD, 1, True)]
    q, k, v, g, beta, _, meta = batch(seqs, 1, 2, 16, 24, device, seed=len(lengths))
    args = dict(q=q, k=k, v=v, g=g, beta=beta, cu_seqlens=meta["cu_seqlens"], state_indices=meta["state_indices"],
                scale=16 ** -0.5, use_qk_l2norm=True)
    expected = chunks.chunk_prepare(**args)
    with refused_split_build(split, device):
        actual = twy.chunk_prepare(**args, split=split)
    if split and device == "cuda":
        return
    for name, a, e in zip(["w", "u", "A", "G", "ks", "qd"], actual, expected):
        assert_rel_close(a.float(), e, 1e-4, name)
