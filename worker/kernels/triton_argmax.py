"""Greedy token choice over the vocabulary, Triton (torch reference: worker.kernels.argmax).

torch's argmax of one 151936-wide row runs as one block of a reduction kernel, 8 µs on an H200.
Here each row is cut into chunks that many programs reduce at once to (max, first index), and a
second launch reduces each row's chunks in order, so ties go to the first index, as torch's do.
Rows holding NaN are not defined (torch picks the NaN); logits never hold one.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule_chunked import _num_sms
from worker.kernels.triton_paged_attention import _check

MIN_CHUNK = 2048  # elements a program reduces at least
PROGRAMS_PER_SM = 4
MAX_BLOCK = 4096  # elements a program loads per step


@triton.jit
def _chunk_argmax_kernel(logits, part_val, part_idx, V, stride_r, CHUNK, NUM_CHUNKS, BLOCK: tl.constexpr,
                         STEPS: tl.constexpr, PDL: tl.constexpr):
    """(max, first index) of one chunk of a row, in BLOCK-wide steps; each lane keeps its first maximum."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    best_val = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK], -1, dtype=tl.int32)
    for step in range(STEPS):  # a constant trip count: the interpreter cannot range over a runtime bound
        offset = step * BLOCK
        cols = chunk * CHUNK + offset + lane
        mask = (offset + lane < CHUNK) & (cols < V)
        x = tl.load(logits + row * stride_r + cols, mask=mask, other=float("-inf")).to(tl.float32)
        take = mask & ((x > best_val) | (best_idx < 0))  # strictly greater: an earlier equal one stays
        best_val = tl.where(take, x, best_val)
        best_idx = tl.where(take, cols, best_idx)
    best = tl.max(best_val, 0)
    first = tl.min(tl.where((best_val == best) & (best_idx >= 0), best_idx, 2**31 - 1), 0)
    tl.store(part_val + row * NUM_CHUNKS + chunk, best)
    tl.store(part_idx + row * NUM_CHUNKS + chunk, first)


@triton.jit
def _rows_argmax_kernel(part_val, part_idx, out, NUM_CHUNKS, BC: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BC)
    mask = c < NUM_CHUNKS
    val = tl.load(part_val + row * NUM_CHUNKS + c, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx + row * NUM_CHUNKS + c, mask=mask, other=2**31 - 1)
    best = tl.max(val, 0)
    tl.store(out + row, tl.min(tl.where(val == best, idx, 2**31 - 1), 0).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> int64 [...]: the first index of each row's maximum."""
    _check(logits.dim() >= 1 and logits.shape[-1] > 0, f"logits must be [..., V] with V > 0, got {tuple(logits.shape)}")
    lead, V = logits.shape[:-1], logits.shape[-1]
    _check(V < 2**31 - 1, f"vocabulary of {V} does not fit int32 indices")
    rows = logits.reshape(-1, V)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R = rows.shape[0]
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R == 0:
        return out.view(lead)
    want = max(1, triton.cdiv(PROGRAMS_PER_SM * _num_sms(logits.device), R))
    num_chunks = min(triton.cdiv(V, MIN_CHUNK), want)
    chunk = triton.cdiv(V, num_chunks)
    block = min(MAX_BLOCK, triton.next_power_of_2(chunk))
    chunk = triton.cdiv(chunk, block) * block  # whole steps: every load starts aligned (unaligned: 2.4x slower)
    num_chunks = triton.cdiv(V, chunk)
    part_val = torch.empty(R, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(R, num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(R, num_chunks)](rows, part_val, part_idx, V, rows.stride(0), chunk, num_chunks, BLOCK=block,
                                          STEPS=triton.cdiv(chunk, block), num_warps=8 if block >= 4096 else 4,
                                          **pdl_launch(logits.device))
    _rows_argmax_kernel[(R,)](part_val, part_idx, out, num_chunks, BC=triton.next_power_of_2(num_chunks),
                              num_warps=1 if num_chunks <= 256 else 4, **pdl_launch(logits.device))
    return out.view(lead)
