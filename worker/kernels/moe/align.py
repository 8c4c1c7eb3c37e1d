"""Group (token, slot) pairs by expert on the device, Triton (reference: reference.moe_align_block_size).

The T*S pairs are cut into chunks of CHUNK. Three stages, no host sync, no atomics:
1. count: each chunk's histogram of experts;
2. offsets (one program): each expert's run padded to block_size, where every chunk's pairs of an
   expert start (chunk_base), the pad fill of sorted_ids and the expert of every block;
3. scatter: each chunk sorts its pairs by (expert, pair) and writes them to chunk_base + rank.
With a single chunk (up to CHUNK pairs: decode-sized batches) the three run in one program.
Buffers are sized from the pair count alone; loops run `while` because the interpreter cannot take
a loaded or argument bound in `range`.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.moe.reference import max_padded_pairs

CHUNK = 1024  # pairs per program; the chunk sort is a bitonic network in registers
BLOCKS_PER_STEP = 16  # blocks whose expert one compare step finds
FILL = 1024


def _empty_index(shape, device) -> torch.Tensor:
    """Index buffers the kernels must fill; tests replace this with a poisoned fill."""
    return torch.empty(shape, dtype=torch.int32, device=device)


@triton.jit
def _chunk_experts(topk_ids, chunk, num_pairs, E, C: tl.constexpr, EP: tl.constexpr):
    """-> (expert of each pair of the chunk, E for the chunk's tail past num_pairs; histogram [EP])."""
    i = tl.arange(0, C)
    pair = chunk * C + i
    e = tl.load(topk_ids + pair, mask=pair < num_pairs, other=E).to(tl.int32)
    return e, tl.histogram(e, EP)


@triton.jit
def _count_kernel(topk_ids, counts, num_pairs, E, C: tl.constexpr, EP: tl.constexpr):
    chunk = tl.program_id(0)
    _, hist = _chunk_experts(topk_ids, chunk, num_pairs, E, C, EP)
    tl.store(counts + chunk * EP + tl.arange(0, EP), hist)


@triton.jit
def _expert_runs(totals, E, BLOCK: tl.constexpr, EP: tl.constexpr):
    """Pairs per expert [EP] -> (start, end) of each expert's padded run in sorted_ids, and the used length."""
    ex = tl.arange(0, EP)
    padded = tl.where(ex < E, (totals + BLOCK - 1) // BLOCK * BLOCK, 0)
    end = tl.cumsum(padded, 0)
    return end - padded, end, tl.sum(padded, 0)


@triton.jit
def _fill_and_map_blocks(sorted_ids, expert_ids, num_padded, run_end, total, num_pairs, max_padded, max_blocks,
                         BLOCK: tl.constexpr, BB: tl.constexpr, FILL_N: tl.constexpr):
    """Pad value everywhere in sorted_ids; the expert of each block (-1 past the used length)."""
    tl.store(num_padded, total)
    f = 0
    while f < max_padded:
        off = f + tl.arange(0, FILL_N)
        tl.store(sorted_ids + off, num_pairs, mask=off < max_padded)
        f += FILL_N
    b = 0
    while b < max_blocks:
        blk = b + tl.arange(0, BB)
        first_row = blk * BLOCK
        owner = tl.sum((run_end[None, :] <= first_row[:, None]).to(tl.int32), 1)
        owner = tl.where(first_row < total, owner, -1)
        tl.store(expert_ids + blk, owner, mask=blk < max_blocks)
        b += BB


@triton.jit
def _offsets_kernel(counts, chunk_base, sorted_ids, expert_ids, num_padded, num_chunks, num_pairs, E, max_padded,
                    max_blocks, BLOCK: tl.constexpr, EP: tl.constexpr, BB: tl.constexpr, FILL_N: tl.constexpr):
    ex = tl.arange(0, EP)
    running = tl.zeros([EP], dtype=tl.int32)
    c = 0
    while c < num_chunks:
        hist = tl.load(counts + c * EP + ex)
        tl.store(chunk_base + c * EP + ex, running)
        running += hist
        c += 1
    run_start, run_end, total = _expert_runs(running, E, BLOCK, EP)
    c = 0
    while c < num_chunks:
        tl.store(chunk_base + c * EP + ex, tl.load(chunk_base + c * EP + ex) + run_start)
        c += 1
    _fill_and_map_blocks(sorted_ids, expert_ids, num_padded, run_end, total, num_pairs, max_padded, max_blocks,
                         BLOCK, BB, FILL_N)


@triton.jit
def _scatter_chunk(topk_ids, base, sorted_ids, chunk, num_pairs, E, C: tl.constexpr, EP: tl.constexpr):
    """Write the chunk's pairs to base[expert] + their rank among the chunk's pairs of that expert."""
    e, hist = _chunk_experts(topk_ids, chunk, num_pairs, E, C, EP)
    i = tl.arange(0, C)
    key = tl.sort(e * C + i)  # unique keys: sorted by expert, pairs in order within one
    expert = key // C
    first_in_chunk = tl.cumsum(hist, 0) - hist
    dest = tl.gather(base, expert, 0) + i - tl.gather(first_in_chunk, expert, 0)
    tl.store(sorted_ids + dest, (chunk * C + key % C).to(tl.int32), mask=expert < E)


@triton.jit
def _scatter_kernel(topk_ids, chunk_base, sorted_ids, num_pairs, E, C: tl.constexpr, EP: tl.constexpr):
    chunk = tl.program_id(0)
    base = tl.load(chunk_base + chunk * EP + tl.arange(0, EP))
    _scatter_chunk(topk_ids, base, sorted_ids, chunk, num_pairs, E, C, EP)


@triton.jit
def _single_chunk_kernel(topk_ids, sorted_ids, expert_ids, num_padded, num_pairs, E, max_padded, max_blocks,
                         BLOCK: tl.constexpr, C: tl.constexpr, EP: tl.constexpr, BB: tl.constexpr,
                         FILL_N: tl.constexpr):
    _, hist = _chunk_experts(topk_ids, 0, num_pairs, E, C, EP)
    run_start, run_end, total = _expert_runs(hist, E, BLOCK, EP)
    _fill_and_map_blocks(sorted_ids, expert_ids, num_padded, run_end, total, num_pairs, max_padded, max_blocks,
                         BLOCK, BB, FILL_N)
    tl.debug_barrier()  # the pad fill lands before the pairs overwrite it
    _scatter_chunk(topk_ids, run_start, sorted_ids, 0, num_pairs, E, C, EP)


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, S]
    num_experts: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (sorted_ids [max_padded] int32, expert_ids [max_padded // block_size] int32, num_padded [1] int32)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, S], got {tuple(topk_ids.shape)}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    topk_ids = topk_ids.contiguous()
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    max_blocks = max_padded // block_size
    sorted_ids = _empty_index((max_padded,), device)
    expert_ids = _empty_index((max_blocks,), device)
    num_padded = _empty_index((1,), device)
    EP = triton.next_power_of_2(num_experts + 1)  # one spare bin for the chunk tail
    common = dict(BLOCK=block_size, EP=EP, BB=BLOCKS_PER_STEP, FILL_N=FILL)
    if num_pairs <= CHUNK:
        C = max(16, triton.next_power_of_2(num_pairs))
        _single_chunk_kernel[(1,)](topk_ids, sorted_ids, expert_ids, num_padded, num_pairs, num_experts, max_padded,
                                   max_blocks, C=C, num_warps=4, **common)
        return sorted_ids, expert_ids, num_padded
    num_chunks = triton.cdiv(num_pairs, CHUNK)
    counts = torch.empty(num_chunks, EP, dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(counts)
    _count_kernel[(num_chunks,)](topk_ids, counts, num_pairs, num_experts, C=CHUNK, EP=EP, num_warps=4)
    _offsets_kernel[(1,)](counts, chunk_base, sorted_ids, expert_ids, num_padded, num_chunks, num_pairs, num_experts,
                          max_padded, max_blocks, num_warps=8, **common)
    _scatter_kernel[(num_chunks,)](topk_ids, chunk_base, sorted_ids, num_pairs, num_experts, C=CHUNK, EP=EP,
                                   num_warps=4)
    return sorted_ids, expert_ids, num_padded
