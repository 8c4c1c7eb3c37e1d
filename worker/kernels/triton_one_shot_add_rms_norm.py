"""The one-shot all-reduce over peer memory fused with the residual add and zero-centred RMSNorm,
Triton (torch reference and buffer layout: worker.kernels.one_shot_add_rms_norm).

One program per row t, the same row on every rank:
1. write x's row t into this rank's buffer (half calls[t] & 1), then `tl.debug_barrier()`, so every
   thread's store comes before the signal;
2. for each peer q, change flags[q][t, rank] from 0 to 1 with release semantics at system scope
   (spinning while it is still 1: q has not yet seen the last call's), then wait for each peer's
   flags[rank][t, q] to be 1 and set it back to 0 with acquire semantics, and `tl.debug_barrier()`
   again, so every thread's loads come after the peers' rows are in place;
3. read row t of every rank's buffer, sum in rank order, add the residual, normalise and store as
   the add + norm kernel does (triton_add_rms_norm._norm_row), and count the call for row t.

So a rank waits only for its peers' same row, in one launch where the unfused path takes three (the
copy into the buffer, torch's one-shot all-reduce, the add + norm). Every program of a rank must meet
its peers' same program: all the programs of a launch run at once (T <= R rows, a few at decode).
Under PDL the program waits for the kernel before it first, then lets the next be placed; the next
kernel's programs only wait, so they cannot keep this kernel's programs from running.

The flags are updated with atomic compare-and-swaps on a vector of one flag per peer: a flag already
done is compared with -1, which it never holds, so it is not written twice.
"""

import torch
import triton
import triton.language as tl

from worker.kernels.one_shot_add_rms_norm import PeerRows
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_add_rms_norm import _empty_output, _norm_row, _row_norm_launch
from worker.kernels.triton_paged_attention import _check


@triton.jit
def _swap_until_done(addrs, expected, new, todo, SEM: tl.constexpr):
    """Compare-and-swap each address of `todo` from `expected` to `new` until every one has succeeded."""
    done = ~todo
    while tl.min(done.to(tl.int32), 0) == 0:
        compare = tl.where(done, -1, expected)
        old = tl.atomic_cas(addrs, compare, compare * 0 + new, sem=SEM, scope="sys")
        done = done | (old == expected)


@triton.jit
def _meet_peers(flag_ptrs, rank, t, WORLD: tl.constexpr, WP: tl.constexpr):
    """Tell every peer that row t of this rank's buffer is in place, then wait until each peer's is."""
    p = tl.arange(0, WP)
    peer = (p < WORLD) & (p != rank)
    mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32)) + t * WORLD
    theirs = tl.load(flag_ptrs + p, mask=p < WORLD, other=0).to(tl.pointer_type(tl.int32)) + t * WORLD + rank
    theirs = tl.where(p < WORLD, theirs, mine + rank)  # padding lanes: this rank's own flag, never swapped
    _swap_until_done(theirs, 0, 1, peer, "release")
    _swap_until_done(mine + tl.where(p < WORLD, p, rank), 1, 0, peer, "acquire")


@triton.jit
def _rows_of(row_ptrs, rank, dtype: tl.constexpr):
    """Rank `rank`'s row buffer, 16-byte aligned (PeerRows.build checks), so its rows load in wide words."""
    return tl.multiple_of(tl.load(row_ptrs + rank).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _one_shot_add_rms_norm_kernel(x, row_ptrs, flag_ptrs, calls, residual, weight, out, new_residual, x_q, x_scale,
                                  rank, R, stride_x, stride_r, stride_o, stride_n, stride_q, stride_s, H, eps,
                                  WORLD: tl.constexpr, WP: tl.constexpr, BH: tl.constexpr, G: tl.constexpr,
                                  QUANT: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr,
                                  PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    mask = h < H
    count = tl.load(calls + t)
    offset = ((count & 1).to(tl.int64) * R + t) * H + h
    dtype = x.dtype.element_ty
    tl.store(_rows_of(row_ptrs, rank, dtype) + offset, tl.load(x + t * stride_x + h, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()
    _meet_peers(flag_ptrs, rank, t, WORLD, WP)
    tl.debug_barrier()
    total = tl.load(_rows_of(row_ptrs, 0, dtype) + offset, mask=mask, other=0.0)
    for q in tl.static_range(1, WORLD):
        row = tl.load(_rows_of(row_ptrs, q, dtype) + offset, mask=mask, other=0.0)
        total = (total.to(tl.float32) + row.to(tl.float32)).to(dtype)  # one rounding per add, as a dtype add
    tl.store(calls + t, count + 1)
    r = total + tl.load(residual + t * stride_r + h, mask=mask, other=0.0)
    tl.store(new_residual + t * stride_n + h, r, mask=mask)
    _norm_row(r, t, h, weight, out, x_q, x_scale, stride_o, stride_q, stride_s, H, eps, BH, G, QUANT, FP8_MAX_,
              MIN_AMAX_)


def one_shot_add_rms_norm(
    x: torch.Tensor,  # [T, H] this rank's partial sum of a row-parallel output
    peers: PeerRows,  # every rank's row buffers, with rows [2, R >= T, H] in x's dtype
    residual: torch.Tensor,  # [T, H] the residual stream so far, the same on every rank
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,  # also the normed rows' e4m3 groups of this many features (a power of 2)
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
    peers.require(x)
    _check(residual.shape == x.shape and residual.dtype == x.dtype,
           f"residual must be {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    T, H = x.shape
    _check(weight.shape == (H,), f"weight must be [{H}], got {tuple(weight.shape)}")
    _check(x.stride(1) == 1 and residual.stride(1) == 1, "x and residual must be contiguous in their last dim")
    out, new_residual = _empty_output(x), _empty_output(x)
    norm = _row_norm_launch(out, quant_block)
    _one_shot_add_rms_norm_kernel[(T,)](
        x, peers.row_ptrs, peers.flag_ptrs, peers.calls, residual, weight, out, new_residual, norm.x_q, norm.x_scale,
        peers.rank, peers.max_rows, x.stride(0), residual.stride(0), out.stride(0), new_residual.stride(0),
        norm.x_q.stride(0), norm.x_scale.stride(0), H, eps, WORLD=peers.world, WP=triton.next_power_of_2(peers.world),
        **norm.constants, **pdl_launch(x.device))
    norm.attach(out)
    return out, new_residual
