"""Inputs of a decode step from the step still in flight, in one launch, Triton (torch reference:
worker.kernels.continue_decode): the reference's gather, concatenation, adds and copies are seven
launches, each about 12 µs of host time, on the step loop's critical path."""

import torch
import triton
import triton.language as tl

from worker.kernels.triton_paged_attention import _check


@triton.jit
def _continue_decode_kernel(token_ids, num_accepted, drafts, positions, input_ids, start, accepted_slot,
                            stride_t, stride_d, stride_p, Q: tl.constexpr, BQ: tl.constexpr, HAS_DRAFTS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.load(num_accepted + b)
    j = tl.arange(0, BQ)
    ids = tl.zeros([BQ], dtype=tl.int64) + tl.load(token_ids + b * stride_t + acc)
    if HAS_DRAFTS:
        ids = tl.where(j == 0, ids, tl.load(drafts + b * stride_d + j - 1, mask=(j > 0) & (j < Q), other=0))
    tl.store(input_ids + b * Q + j, ids, mask=j < Q)
    tl.store(start + b, tl.load(positions + b * stride_p) + acc + 1)
    tl.store(accepted_slot + b, acc + 1)


def continue_decode_inputs(token_ids, num_accepted, drafts, positions, input_ids, start, accepted_slot) -> None:
    n, q = positions.shape
    _check(token_ids.shape[0] == n and num_accepted.shape == (n,) and input_ids.shape == (n * q,)
           and start.shape == (n,) and accepted_slot.shape == (n,),
           f"rows disagree: token_ids {tuple(token_ids.shape)}, num_accepted {tuple(num_accepted.shape)}, positions "
           f"{tuple(positions.shape)}, input_ids {tuple(input_ids.shape)}, start {tuple(start.shape)}")
    _check(drafts is None or drafts.shape == (n, q - 1), f"drafts must be [{n}, {q - 1}]")
    _check(all(t.stride(-1) == 1 for t in (token_ids, positions, input_ids, start, accepted_slot))
           and (drafts is None or drafts.stride(-1) == 1), "the tensors must be contiguous in their last dim")
    if n == 0:
        return
    _continue_decode_kernel[(n,)](
        token_ids, num_accepted, token_ids if drafts is None else drafts, positions, input_ids, start, accepted_slot,
        token_ids.stride(0), 0 if drafts is None else drafts.stride(0), positions.stride(0),
        Q=q, BQ=triton.next_power_of_2(q), HAS_DRAFTS=drafts is not None, num_warps=1)
