"""Turn a step's per-sequence slices into the flat tensors and metadata the model reads."""

from dataclasses import dataclass

import torch

from worker.engine.host_io import to_device
from worker.model.context import PAD_SLOT, AttentionMetadata, GDNMetadata, StepContext


@dataclass
class SequenceSlice:
    """The tokens one sequence feeds in this step, and where its caches live."""

    token_ids: list[int]
    start_position: int  # position of token_ids[0]
    block_table: list[int]
    state_group: int = PAD_SLOT
    num_accepted: int = 1  # the sequence's GDN state is slot num_accepted-1 of its group
    is_decode: bool = False  # recurrent part: exactly decode_query_len tokens, states written per position

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_position + self.num_tokens


def slot_mapping_for(block_table: list[int], start: int, count: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + count)]


def build_step_inputs(slices: list[SequenceSlice], block_size: int, decode_query_len: int,
                      device: torch.device | str, with_gdn: bool = True):
    """-> (input_ids [T], positions [T], StepContext). Decode slices must come first."""
    num_decodes = 0
    for i, s in enumerate(slices):
        if s.is_decode:
            if i != num_decodes:
                raise ValueError("decode slices must precede prefill slices")
            if s.num_tokens != decode_query_len:
                raise ValueError(f"decode slice has {s.num_tokens} tokens, expected {decode_query_len}")
            num_decodes += 1
    input_ids, positions, slots, cu = [], [], [], [0]
    for s in slices:
        input_ids += s.token_ids
        positions += range(s.start_position, s.context_len)
        slots += slot_mapping_for(s.block_table, s.start_position, s.num_tokens, block_size)
        cu.append(cu[-1] + s.num_tokens)
    max_blocks = max((len(s.block_table) for s in slices), default=0) or 1
    tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in slices]

    device = torch.device(device)

    def tensor(data, dtype):
        return to_device(data, dtype, device)

    attn = AttentionMetadata(
        cu_seqlens_q=tensor(cu, torch.int32),
        context_lens=tensor([s.context_len for s in slices], torch.int32),
        slot_mapping=tensor(slots, torch.int64),
        block_tables=tensor(tables, torch.int32),
        max_seqlen_q=max((s.num_tokens for s in slices), default=0),
        max_context_len=max((s.context_len for s in slices), default=0),
    )
    gdn = None
    if with_gdn:
        prefill_cu = [c - cu[num_decodes] for c in cu[num_decodes:]]
        gdn = GDNMetadata(
            num_decodes=num_decodes,
            decode_query_len=decode_query_len,
            state_indices=tensor([s.state_group for s in slices], torch.int64),
            num_accepted=tensor([s.num_accepted for s in slices], torch.int64),
            has_initial_state=tensor([s.start_position > 0 for s in slices], torch.bool),
            prefill_cu_seqlens=tensor(prefill_cu, torch.int32),
        )
    return tensor(input_ids, torch.int64), tensor(positions, torch.int64), StepContext(attn, gdn)
