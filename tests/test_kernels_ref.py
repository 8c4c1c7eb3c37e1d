"""The torch reference kernels (worker/kernels) against simple independent formulations.

State pools and caches are pre-filled with NaN wherever a kernel must not read, so a stray read
shows up as NaN in the output; PAD (-1) state indices and slots must leave everything untouched.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter, torch_chunk_gated_delta_rule

from worker import kernels
from worker.kernels.moe import reference as moe_reference

PAD = -1
CONV_KERNEL = 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def assert_close(actual, expected, what="", atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_unchanged(after, before, what=""):
    torch.testing.assert_close(after, before, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# ---------------------------------------------------------------- gated delta rule

def gdn_inputs(tokens: int, heads: int, v_heads: int, dk: int = 16, dv: int = 24, seed: int = 0, lead=()):
    """q, k [*lead, T, H, dk]; v [*lead, T, HV, dv]; g <= 0 and beta in (0, 1) [*lead, T, HV]."""
    q = randn(*lead, tokens, heads, dk, seed=seed)
    k = randn(*lead, tokens, heads, dk, seed=seed + 1)
    v = randn(*lead, tokens, v_heads, dv, seed=seed + 2)
    g = F.logsigmoid(randn(*lead, tokens, v_heads, seed=seed + 3) + 2.0)  # decay ~0.5..1
    beta = randn(*lead, tokens, v_heads, seed=seed + 4).sigmoid()
    return q, k, v, g, beta


HEADS = [pytest.param((2, 2), id="nv=nk"), pytest.param((2, 4), id="nv=2nk")]

# Per sequence: (length, state group or PAD, num_accepted, has_initial_state). Groups out of order.
CHUNK_CASES = [
    pytest.param([(63, 3, 1, False)], id="63-fresh"),
    pytest.param([(63, 1, 2, True)], id="63-from-slot1"),
    pytest.param([(1, 4, 3, True), (63, 0, 1, False), (130, 2, 1, True), (5, PAD, 1, True), (7, 1, 2, True)],
                 id="packed-1-63-130-pad-7"),
    pytest.param([(500, 2, 3, True)], id="500-from-slot2"),
]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seqs", CHUNK_CASES)
def test_chunk_gated_delta_rule_vs_hf(seqs, heads):
    nk, nv = heads
    lengths = [s[0] for s in seqs]
    q, k, v, g, beta = gdn_inputs(sum(lengths), nk, nv, seed=len(lengths))
    states = randn(5, 3, nv, 16, 24, seed=7, scale=0.5)  # [G, 1+k, HV, K, V], k = 2
    for length, group, _, has_init in seqs:
        if group != PAD and not has_init:
            states[group] = float("nan")  # a fresh sequence must not read its group
    before = states.clone()
    groups = torch.tensor([s[1] for s in seqs])
    accepted = torch.tensor([s[2] for s in seqs])
    has_init = torch.tensor([s[3] for s in seqs])
    cu = cu_seqlens(lengths)

    out = kernels.chunk_gated_delta_rule(q, k, v, g, beta, cu, states, groups, accepted, has_init)

    touched = set()
    for n, (length, group, num_accepted, init) in enumerate(seqs):
        if group == PAD:
            continue
        touched.add(group)
        rows = slice(cu[n], cu[n + 1])
        initial = before[group, num_accepted - 1][None] if init else None
        ref_out, ref_state = torch_chunk_gated_delta_rule(
            q[None, rows], k[None, rows], v[None, rows], g[None, rows], beta[None, rows],
            initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert_close(out[rows], ref_out[0], f"sequence {n} output")
        assert_close(states[group, 0], ref_state[0], f"sequence {n} final state (slot 0)")
        assert_unchanged(states[group, 1:], before[group, 1:], f"sequence {n} slots 1..k")
    for group in set(range(states.shape[0])) - touched:
        assert_unchanged(states[group], before[group], f"untouched group {group}")


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("k_spec", [0, 1, 2, 3], ids=lambda k: f"k{k}")
def test_fused_recurrent_equals_chunk(k_spec, heads):
    """Decode / verify of 1+k tokens per sequence from slot num_accepted-1: output row j and slot j
    equal the chunk kernel run on the first j+1 tokens from the same state."""
    nk, nv = heads
    q_len = 1 + k_spec
    accepted_values = list(range(1, q_len + 1))  # every num_accepted 1..1+k, one sequence each
    groups = list(range(len(accepted_values)))[::-1] + [PAD]
    accepted = accepted_values + [1]
    n = len(groups)
    q, k, v, g, beta = gdn_inputs(q_len, nk, nv, seed=11, lead=(n,))
    states = randn(n + 1, q_len, nv, 16, 24, seed=12, scale=0.5)
    before = states.clone()

    out = kernels.fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, states, torch.tensor(groups), torch.tensor(accepted))

    for i, (group, num_accepted) in enumerate(zip(groups, accepted)):
        if group == PAD:
            continue
        for j in range(q_len):
            scratch = before.clone()
            ref = kernels.chunk_gated_delta_rule(
                q[i, : j + 1], k[i, : j + 1], v[i, : j + 1], g[i, : j + 1], beta[i, : j + 1], cu_seqlens([j + 1]),
                scratch, torch.tensor([group]), torch.tensor([num_accepted]), torch.tensor([True]))
            assert_close(out[i, j], ref[j], f"sequence {i} (num_accepted {num_accepted}) row {j}")
            assert_close(states[group, j], scratch[group, 0], f"sequence {i} (num_accepted {num_accepted}) slot {j}")
    assert_unchanged(states[n], before[n], "group no sequence uses")


def test_gdn_gating_formula():
    a, b = randn(9, 4, seed=1), randn(9, 4, seed=2)
    A_log, dt_bias = randn(4, seed=3), randn(4, seed=4)
    g, beta = kernels.gdn_gating(a, b, A_log, dt_bias)
    assert_close(g, -torch.exp(A_log) * torch.log1p(torch.exp(a + dt_bias)), "g")
    assert_close(beta, 1 / (1 + torch.exp(-b)), "beta")


# ---------------------------------------------------------------- causal conv1d

def conv_reference(history: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv + SiLU of a whole history [L, D] from zeros, with F.conv1d -> [L, D]."""
    y = F.conv1d(history.t()[None], weight[:, None, :], padding=weight.shape[1] - 1, groups=weight.shape[0])
    return F.silu(y[0, :, : history.shape[0]]).t()


# Per sequence: (length, group or PAD, num_accepted, has_initial_state); conv width K-1+k with k = 2.
CONV_FN_CASES = [
    pytest.param([(63, 2, 1, False)], id="63-fresh"),
    pytest.param([(63, 0, 3, True)], id="63-from-col2"),
    pytest.param([(1, 3, 2, True), (2, 0, 1, False), (63, 4, 1, True), (9, PAD, 1, True), (500, 1, 3, True)],
                 id="packed-1-2-63-pad-500"),
]


@pytest.mark.parametrize("seqs", CONV_FN_CASES)
def test_causal_conv1d_fn_vs_conv1d(seqs):
    channels, k_spec = 12, 2
    lengths = [s[0] for s in seqs]
    x = randn(sum(lengths), channels, seed=21)
    weight = randn(channels, CONV_KERNEL, seed=22, scale=0.5)
    states = randn(6, channels, CONV_KERNEL - 1 + k_spec, seed=23)
    for _, group, _, has_init in seqs:
        if group != PAD and not has_init:
            states[group] = float("nan")
    before = states.clone()
    cu = cu_seqlens(lengths)

    out = kernels.causal_conv1d_fn(
        x, weight, cu, states, torch.tensor([s[1] for s in seqs]), torch.tensor([s[2] for s in seqs]),
        torch.tensor([s[3] for s in seqs]))

    touched = set()
    for n, (length, group, num_accepted, has_init) in enumerate(seqs):
        if group == PAD:
            continue
        touched.add(group)
        rows = slice(cu[n], cu[n + 1])
        start = num_accepted - 1
        prev = before[group, :, start : start + CONV_KERNEL - 1].t() if has_init else torch.zeros(3, channels)
        history = torch.cat([prev, x[rows]])  # the K-1 inputs before the chunk, then the chunk
        assert_close(out[rows], conv_reference(history, weight)[CONV_KERNEL - 1 :], f"sequence {n} output")
        assert_close(states[group, :, : CONV_KERNEL - 1], history[-(CONV_KERNEL - 1) :].t(),
                     f"sequence {n} state columns 0..K-2", atol=0, rtol=0)
        assert_unchanged(states[group, :, CONV_KERNEL - 1 :], before[group, :, CONV_KERNEL - 1 :],
                         f"sequence {n} columns past K-2")
    for group in set(range(states.shape[0])) - touched:
        assert_unchanged(states[group], before[group], f"untouched group {group}")


@pytest.mark.parametrize("k_spec", [0, 1, 2, 3], ids=lambda k: f"k{k}")
def test_causal_conv1d_update_every_num_accepted(k_spec):
    """Prefill a prompt, verify 1+k tokens, accept num_accepted of them (every value 1..1+k, one
    sequence each, plus a PAD row), then run the next 1+k tokens: the outputs equal the conv of the
    accepted history recomputed from scratch."""
    channels, q_len, prompt_len = 10, 1 + k_spec, 9
    accepted = list(range(1, q_len + 1)) + [1]
    groups = list(range(q_len))[::-1] + [PAD]
    n = len(groups)
    weight = randn(channels, CONV_KERNEL, seed=31, scale=0.5)
    prompts = randn(n, prompt_len, channels, seed=32)
    verify_in = randn(n, q_len, channels, seed=33)
    next_in = randn(n, q_len, channels, seed=34)
    states = torch.full((n + 1, channels, CONV_KERNEL - 1 + k_spec), float("nan"))
    group_t = torch.tensor(groups)

    kernels.causal_conv1d_fn(prompts.flatten(0, 1), weight, cu_seqlens([prompt_len] * n), states, group_t,
                             torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    out_verify = kernels.causal_conv1d_update(verify_in, weight, states, group_t, torch.ones(n, dtype=torch.long))
    before_next = states.clone()
    out_next = kernels.causal_conv1d_update(next_in, weight, states, group_t, torch.tensor(accepted))

    for i, (group, num_accepted) in enumerate(zip(groups, accepted)):
        if group == PAD:
            continue
        verified = conv_reference(torch.cat([prompts[i], verify_in[i]]), weight)[prompt_len:]
        assert_close(out_verify[i], verified, f"sequence {i} verify step")
        history = torch.cat([prompts[i], verify_in[i, :num_accepted], next_in[i]])
        assert_close(out_next[i], conv_reference(history, weight)[-q_len:],
                     f"sequence {i} next step after accepting {num_accepted}")
        assert_close(states[group].t(), history[-(CONV_KERNEL - 1 + k_spec) :], f"sequence {i} stored window",
                     atol=0, rtol=0)
    assert_unchanged(states[n], before_next[n], "group no sequence uses")


# ---------------------------------------------------------------- paged attention

# Per sequence: (query length, KV length once the step's tokens are written).
ATTN_CASES = [
    pytest.param([(1, 1)], id="first-token"),
    pytest.param([(63, 63)], id="prefill-63"),
    pytest.param([(1, 37), (4, 20), (63, 63), (5, 5), (1, 9)], id="mixed-decode-verify-prefill"),
]


@pytest.mark.parametrize("heads", [pytest.param((4, 2), id="gqa"), pytest.param((3, 3), id="mha")])
@pytest.mark.parametrize("seqs", ATTN_CASES)
def test_paged_attention_vs_dense(seqs, heads):
    num_heads, kv_heads, head_dim, block_size = *heads, 24, 4
    blocks_needed = [-(-kv // block_size) for _, kv in seqs]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=gen(41)).tolist()  # scattered blocks
    tables = [[order.pop() for _ in range(nb)] for nb in blocks_needed]
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v_cache = k_cache.clone()
    keys = [randn(kv, kv_heads, head_dim, seed=42 + i) for i, (_, kv) in enumerate(seqs)]
    values = [randn(kv, kv_heads, head_dim, seed=62 + i) for i, (_, kv) in enumerate(seqs)]
    queries = [randn(q, num_heads, head_dim, seed=82 + i) for i, (q, _) in enumerate(seqs)]

    # Write every KV position, with one PAD slot that must not land anywhere.
    slots = [table[p // block_size] * block_size + p % block_size
             for table, (_, kv) in zip(tables, seqs) for p in range(kv)]
    all_k, all_v = torch.cat(keys), torch.cat(values)
    kernels.reshape_and_cache(torch.cat([all_k, all_k[:1] + 100]), torch.cat([all_v, all_v[:1] + 100]),
                              k_cache, v_cache, torch.tensor(slots + [PAD]))
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots] = True
    assert k_cache.flatten(0, 1)[~written].isnan().all(), "a PAD slot was written"

    max_blocks = max(blocks_needed)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    scale = head_dim**-0.5
    out = kernels.paged_attention(torch.cat(queries), k_cache, v_cache, cu_seqlens([q for q, _ in seqs]),
                                  torch.tensor([kv for _, kv in seqs], dtype=torch.int32), block_tables, scale)

    start = 0
    for i, (q_len, kv_len) in enumerate(seqs):
        ref = dense_causal_attention(queries[i], keys[i], values[i], scale)
        assert_close(out[start : start + q_len], ref, f"sequence {i} (q {q_len}, kv {kv_len})")
        start += q_len


def dense_causal_attention(q, k, v, scale):
    """q [Q, H, D] are the last Q positions of k, v [L, H_kv, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    offset = k.shape[0] - q.shape[0]
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(offset)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


# ---------------------------------------------------------------- MoE

@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
@pytest.mark.parametrize("top_k", [1, 2, 4], ids=lambda k: f"top{k}")
def test_select_experts_vs_hf_router(top_k, renormalize):
    hidden, experts = 16, 8
    router = Qwen3NextTopKRouter(SimpleNamespace(num_experts_per_tok=top_k, num_experts=experts,
                                                 norm_topk_prob=renormalize, hidden_size=hidden))
    router.weight.data = randn(experts, hidden, seed=51)
    x = randn(63, hidden, seed=52)
    with torch.no_grad():
        _, hf_weights, hf_ids = router(x)
    weights, ids = kernels.select_experts(x @ router.weight.t(), top_k, renormalize)
    assert torch.equal(ids, hf_ids)
    assert_close(weights, hf_weights, "routing weights")


@pytest.mark.parametrize("tokens", [5, 63], ids=["per-pair", "per-expert"])  # <= / > PER_PAIR_MAX_PAIRS pairs
@pytest.mark.parametrize("top_k", [2, 4], ids=lambda k: f"top{k}")
def test_fused_moe_vs_token_loop(top_k, tokens):
    hidden, inter, experts = 16, 12, 8
    x = randn(tokens, hidden, seed=61)
    w13 = randn(experts, 2 * inter, hidden, seed=62, scale=0.3)
    w2 = randn(experts, hidden, inter, seed=63, scale=0.3)
    weights, ids = kernels.select_experts(randn(tokens, experts, seed=64), top_k, renormalize=False)
    ids[0] = torch.arange(top_k)  # some experts used by one token only, others by many
    out = kernels.fused_moe(x, w13, w2, weights, ids)

    ref = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            ref[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    assert_close(out, ref, "fused_moe")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 5, 31])
def test_fused_moe_all_experts_path_equals_the_gathered_one(tokens, dtype):
    """Where a step has as many (token, slot) pairs as experts, the CPU reference runs every expert on every
    token; a token's output equals the per-pair gather that one-token steps take, up to rounding. (Bit for
    bit only where the CPU's BLAS rounds a column alike whatever the number of columns: an Intel Xeon did,
    an AMD EPYC does not, as its F.linear rounds a lone row apart from a batch's.)"""
    hidden, inter, experts, top_k = 80, 48, 8, 2
    x = randn(tokens, hidden, seed=65).to(dtype)
    w13 = randn(experts, 2 * inter, hidden, seed=66, scale=0.1).to(dtype)
    w2 = randn(experts, hidden, inter, seed=67, scale=0.1).to(dtype)
    weights, ids = kernels.select_experts(randn(tokens, experts, seed=68), top_k, renormalize=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(moe_reference._all_experts(x, w13, w2, ids),
                               moe_reference._gathered_experts(x, w13, w2, ids), **tol)
    one_at_a_time = torch.cat([kernels.fused_moe(x[t : t + 1], w13, w2, weights[t : t + 1], ids[t : t + 1])
                               for t in range(tokens)])
    torch.testing.assert_close(kernels.fused_moe(x, w13, w2, weights, ids), one_at_a_time, **tol)
