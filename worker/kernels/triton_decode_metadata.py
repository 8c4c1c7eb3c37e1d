"""Per-step metadata of decode / verify rows in one launch, Triton (torch reference:
worker.kernels.decode_metadata): the reference's dozen small ops at every step become one kernel."""

import torch
import triton
import triton.language as tl

from worker.kernels.decode_metadata import PAD_SLOT
from worker.kernels.triton_paged_attention import _check


@triton.jit
def _decode_metadata_kernel(start, block_tables, valid, positions, slots, context_lens, stride_bt,
                            Q: tl.constexpr, BQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_VALID: tl.constexpr,
                            PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BQ)
    mask = j < Q
    s = tl.load(start + b)
    pos = s + j
    block = tl.load(block_tables + b * stride_bt + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    if HAS_VALID:
        slot = tl.where(tl.load(valid + b) != 0, slot, PAD)
    tl.store(positions + b * Q + j, pos, mask=mask)
    tl.store(slots + b * Q + j, slot, mask=mask)
    tl.store(context_lens + b, (s + Q).to(tl.int32))


def decode_metadata(
    start: torch.Tensor,  # [B] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    valid: torch.Tensor | None,  # [B] bool; None: all real
    query_len: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = start.shape[0]
    _check(start.dim() == 1 and block_tables.dim() == 2 and block_tables.shape[0] == B,
           f"start must be [B] and block_tables [B, max_blocks], got {tuple(start.shape)}, {tuple(block_tables.shape)}")
    _check(valid is None or valid.shape == (B,), f"valid must be [{B}], got {None if valid is None else tuple(valid.shape)}")
    _check(block_tables.stride(1) == 1, "block_tables must be contiguous in its rows")
    positions = torch.empty(B, query_len, dtype=torch.int64, device=start.device)
    slots = torch.empty(B, query_len, dtype=torch.int64, device=start.device)
    context_lens = torch.empty(B, dtype=torch.int32, device=start.device)
    if B:
        _decode_metadata_kernel[(B,)](start, block_tables, valid if valid is not None else start, positions, slots,
                                      context_lens, block_tables.stride(0), Q=query_len,
                                      BQ=triton.next_power_of_2(query_len), BLOCK_SIZE=block_size,
                                      HAS_VALID=valid is not None, PAD=PAD_SLOT, num_warps=1)
    return positions, slots, context_lens
