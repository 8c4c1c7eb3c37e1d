"""The one-shot all-reduce + residual add + RMSNorm kernel against its reference and against the unfused
path (the sum in rank order, then the add + norm kernel), bit for bit.

Turns: in one process the ranks' launches are played one after another, 0..N-1, each finding its
peers' rows and flags as if they had arrived: rank r's turn needs flags[r][t, q] set for every peer q;
the ranks before it set theirs in their turns, and those after it are set beforehand (flags[p][t, q] =
1 for q > p). A round leaves the flags exactly so again, which the test checks, and plays twice, once
in each half of the buffers. At once: on the CPU two processes run the interpreted kernel on shared
memory, each at its own pace; on one GPU two streams run the ranks' launches.
"""

import importlib
import pickle

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_rel_close, generator, randn, tolerance

ref = importlib.import_module("worker.kernels.one_shot_add_rms_norm")
norm_ref = importlib.import_module("worker.kernels.add_rms_norm")
tk = pytest.importorskip("worker.kernels.triton_one_shot_add_rms_norm", reason="triton is not installed")
tk_norm = importlib.import_module("worker.kernels.triton_add_rms_norm")

MAX_ROWS = 8
EPS = 1e-6


def make_group(world: int, hidden: int, dtype, device) -> list:
    """Each rank's PeerRows over one set of buffers: rows NaN (never read unwritten), flags zero."""
    rows = [torch.full((2, MAX_ROWS, hidden), float("nan"), dtype=dtype, device=device) for _ in range(world)]
    flags = [torch.zeros(MAX_ROWS, world, dtype=torch.int32, device=device) for _ in range(world)]
    return [ref.PeerRows.build(rank, rows, flags) for rank in range(world)]


def flags_before(world: int, tokens: int, device) -> torch.Tensor:
    """[N, R, N]: flags[p][t, q] = 1 for q > p and rows t < tokens, what a round needs beforehand and leaves."""
    later = torch.arange(world)[None, :] > torch.arange(world)[:, None]
    flags = torch.zeros(world, MAX_ROWS, world, dtype=torch.int32)
    flags[:, :tokens] = later[:, None, :].to(torch.int32)
    return flags.to(device)


def round_inputs(world, tokens, hidden, dtype, device, seed):
    gen = generator(seed, device)
    parts = [randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=2.0) for _ in range(world)]
    residual = randn(tokens, hidden, gen=gen, device=device, dtype=dtype, scale=4.0)
    weight = randn(hidden, gen=gen, device=device, scale=0.1).to(dtype)
    return parts, residual, weight


def in_rank_order(parts):
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def play_round(group, parts, residual, weight, quant_block, half):
    """Each rank's launch in turn; the ranks after the first write their rows beforehand, as they would
    have before they set the flags the earlier ranks find."""
    for rank in range(1, len(group)):
        group[rank].rows[rank][half, :parts[rank].shape[0]] = parts[rank]
    return [tk.one_shot_add_rms_norm(x=parts[rank], peers=group[rank], residual=residual, weight=weight, eps=EPS,
                                     quant_block=quant_block) for rank in range(len(group))]


def assert_same_bits(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=lambda m: f"{what}: {m}")


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# bf16 only on a GPU: the interpreter neither adds bf16 nor rounds fp32 to it as the GPU does.
ON_GPU = [pytest.mark.gpu, needs_cuda]
CASES = [  # (world, tokens, hidden, dtype, quant_block)
    pytest.param(2, 1, 64, torch.float32, None, id="n2-t1-h64-fp32"),
    pytest.param(3, 2, 96, torch.float32, None, id="n3-t2-h96-fp32"),  # not a power of two: padding flag lanes
    pytest.param(4, 5, 200, torch.float32, None, id="n4-t5-h200-fp32"),
    pytest.param(2, 2, 256, torch.float32, 64, id="n2-t2-h256-fp32-e4m3"),  # with the e4m3 groups for FP8
    pytest.param(2, 3, 200, torch.bfloat16, None, id="n2-t3-h200-bf16", marks=ON_GPU),
    pytest.param(4, 8, 2048, torch.bfloat16, 128, id="n4-t8-h2048-bf16-e4m3", marks=ON_GPU),
]


def as_int32(count: int) -> int:
    return (count + 2**31) % 2**32 - 2**31


def play_two_rounds(world, tokens, hidden, dtype, quant_block, device, first_count=0):
    """Two rounds from call count `first_count`, each rank's result against the unfused path and the reference,
    and the rows, call counts and flags each round leaves."""
    group = make_group(world, hidden, dtype, device)
    reference_group = make_group(world, hidden, dtype, device)
    for p in range(world):
        group[p].flags[p].copy_(flags_before(world, tokens, device)[p])
        group[p].calls[:tokens] = first_count
        reference_group[p].calls[:tokens] = first_count
    for i in (0, 1):
        half = as_int32(first_count + i) & 1
        parts, residual, weight = round_inputs(world, tokens, hidden, dtype, device, seed=17 * i + world)
        outs = play_round(group, parts, residual, weight, quant_block, half)
        for p in range(world):  # the reference does not wait: every rank's rows are in place first
            reference_group[p].rows[p][half, :tokens] = parts[p]
        unfused = tk_norm.fused_add_rms_norm(in_rank_order(parts), residual, weight, EPS, quant_block)
        for rank, (normed, new_residual) in enumerate(outs):
            assert_same_bits(new_residual, unfused[1], f"rank {rank} new residual")
            assert_same_bits(normed, unfused[0], f"rank {rank} normed")
            if quant_block is not None:
                from worker.kernels.fp8.quant import attached_token_groups

                for mine, theirs in zip(attached_token_groups(normed, quant_block),
                                        attached_token_groups(unfused[0], quant_block)):
                    assert_same_bits(mine.float(), theirs.float(), f"rank {rank} e4m3 groups")
            expected = ref.one_shot_add_rms_norm(x=parts[rank], peers=reference_group[rank], residual=residual,
                                                 weight=weight, eps=EPS)
            assert_same_bits(new_residual, expected[1], f"rank {rank} new residual vs the reference")
            assert_rel_close(normed, expected[0], tolerance(dtype), f"rank {rank} normed vs the reference")
        for p in range(world):
            assert_same_bits(group[p].rows[p][half, :tokens], parts[p], f"rank {p}'s rows in half {half}")
            assert group[p].calls[:tokens].tolist() == [as_int32(first_count + i + 1)] * tokens
            assert group[p].calls[tokens:].eq(0).all()
            assert_same_bits(group[p].flags[p], flags_before(world, tokens, device)[p],
                             f"rank {p}'s flags after the round")


@pytest.mark.parametrize("world,tokens,hidden,dtype,quant_block", CASES)
def test_every_rank_gets_the_unfused_paths_bits_over_two_rounds(world, tokens, hidden, dtype, quant_block, device):
    play_two_rounds(world, tokens, hidden, dtype, quant_block, device)


def test_the_call_count_wraps_past_2_31_and_the_halves_still_alternate(device):
    """Hours of decoding at batch 1 take a row's int32 count past 2^31 - 1: half 1, then half 0 at -2^31."""
    play_two_rounds(2, 2, 64, torch.float32, None, device, first_count=2**31 - 1)


CALLS = 12


def _interpreted_rank(rank: int, rows, flags, results) -> None:
    """One rank in its own process, on buffers shared with the other: CALLS calls back to back, each
    with new rows, meeting the other process through the flags (its own pointers to the shared memory)."""
    peers = ref.PeerRows.build(rank, rows, flags)
    outs = []
    for i in range(CALLS):
        parts, residual, weight = round_inputs(len(rows), 3, rows[0].shape[-1], torch.float32, "cpu", seed=i)
        outs.append(tk.one_shot_add_rms_norm(x=parts[rank], peers=peers, residual=residual, weight=weight, eps=EPS))
    results.put((rank, pickle.dumps((outs, peers.calls))))  # by value: shared tensors die with this process


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's test; on a GPU the two-streams test runs the ranks at once")
def test_two_processes_meet_through_flags_in_shared_memory():
    """The ranks really at once: two processes run the interpreted kernel on shared CPU memory, each at its
    own pace (one may be a call ahead), each call's result against the unfused path's."""
    import torch.multiprocessing as mp

    world, hidden = 2, 64
    rows = [torch.full((2, MAX_ROWS, hidden), float("nan")).share_memory_() for _ in range(world)]
    flags = [torch.zeros(MAX_ROWS, world, dtype=torch.int32).share_memory_() for _ in range(world)]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_interpreted_rank, args=(r, rows, flags, results), daemon=True)
                 for r in range(world)]
    for p in processes:
        p.start()
    by_rank = {}
    try:
        for _ in processes:
            rank, data = results.get(timeout=120)  # a rank left waiting for the other would spin until here
            outs, calls = pickle.loads(data)
            by_rank[rank] = outs
            assert calls[:3].tolist() == [CALLS] * 3 and calls[3:].eq(0).all()
        for p in processes:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
    for i in range(CALLS):
        parts, residual, weight = round_inputs(world, 3, hidden, torch.float32, "cpu", seed=i)
        normed, new_residual = tk_norm.fused_add_rms_norm(in_rank_order(parts), residual, weight, EPS)
        for rank in range(world):
            assert_same_bits(by_rank[rank][i][1], new_residual, f"call {i} rank {rank} new residual")
            assert_same_bits(by_rank[rank][i][0], normed, f"call {i} rank {rank} normed")
    for p in range(world):
        assert flags[p].eq(0).all()


def test_rows_that_do_not_fit_the_buffers_are_refused(device):
    group = make_group(2, 64, torch.float32, device)
    weight = torch.zeros(64, device=device)
    for x in (torch.zeros(MAX_ROWS + 1, 64, device=device), torch.zeros(1, 32, device=device),
              torch.zeros(1, 64, dtype=torch.bfloat16, device=device)):
        with pytest.raises(ValueError, match="does not fit rows"):
            tk.one_shot_add_rms_norm(x=x, peers=group[0], residual=x, weight=weight, eps=EPS)
        with pytest.raises(ValueError, match="does not fit rows"):
            ref.one_shot_add_rms_norm(x=x, peers=group[0], residual=x, weight=weight, eps=EPS)


def test_peer_rows_are_checked_when_built():
    rows = [torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)]
    with pytest.raises(ValueError, match="int32"):
        ref.PeerRows.build(0, rows, [torch.zeros(4, 2), torch.zeros(4, 2)])
    with pytest.raises(ValueError, match=r"\[2, R, H\]"):
        ref.PeerRows.build(0, [torch.zeros(3, 4, 8)] * 2, [torch.zeros(4, 2, dtype=torch.int32)] * 2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ref.PeerRows.build(2, rows, [torch.zeros(4, 2, dtype=torch.int32)] * 2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_two_ranks_on_two_streams_meet_through_the_flags(dtype, device):
    """Both ranks' launches run at once on one GPU, 200 calls queued back to back with new rows each time
    (a rank may run a call ahead of its peer; the halves alternate, the flags go up and down), each
    call's result checked against the unfused path."""
    world, tokens, hidden = 2, 4, 2048
    group = make_group(world, hidden, dtype, device)
    streams = [torch.cuda.Stream() for _ in range(world)]
    calls = [[*round_inputs(world, tokens, hidden, dtype, device, seed=i), []] for i in range(200)]
    torch.cuda.synchronize()
    for parts, residual, weight, outs in calls:
        for rank, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs.append(tk.one_shot_add_rms_norm(x=parts[rank], peers=group[rank], residual=residual,
                                                     weight=weight, eps=EPS))
    torch.cuda.synchronize()
    for i, (parts, residual, weight, outs) in enumerate(calls):
        normed, new_residual = tk_norm.fused_add_rms_norm(in_rank_order(parts), residual, weight, EPS)
        for rank, out in enumerate(outs):
            assert_same_bits(out[1], new_residual, f"call {i} rank {rank} new residual")
            assert_same_bits(out[0], normed, f"call {i} rank {rank} normed")
    for p in range(world):
        assert group[p].flags[p].eq(0).all()
        assert group[p].calls[:tokens].eq(200).all()
