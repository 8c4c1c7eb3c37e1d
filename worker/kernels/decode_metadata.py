"""Per-step metadata of decode / verify rows computed on the device, torch reference.

Sequence b feeds Q tokens at positions start[b] .. start[b] + Q - 1; each writes its KV to slot
block_tables[b, p // block_size] * block_size + p % block_size, or to PAD_SLOT (nothing) when the
row is padding; its context is start[b] + Q keys. The decode graphs compute this for every step,
and the MTP head for each chained draft (Q = 1).
"""

import torch

PAD_SLOT = -1  # a KV slot or GDN state group that nothing reads or writes (worker.model.context re-exports it)


def decode_metadata(
    start: torch.Tensor,  # [B] int64, position of each sequence's first token this step
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    valid: torch.Tensor | None,  # [B] bool, False for padding rows; None: all real
    query_len: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (positions [B, Q] int64, slot_mapping [B, Q] int64,
    #                                                        context_lens [B] int32)
    offsets = torch.arange(query_len, dtype=torch.int64, device=start.device)
    positions = start[:, None] + offsets[None, :]
    blocks = block_tables.gather(1, positions // block_size)
    slots = (positions % block_size).add_(blocks, alpha=block_size)  # int64: the offset plus block * block_size
    if valid is not None:
        slots = torch.where(valid[:, None], slots, PAD_SLOT)
    return positions, slots, (start + query_len).to(torch.int32)
