"""Per-step metadata handed to the model as one typed object.

Layers read it through `get_context()` so their signatures stay `(positions, hidden_states)`.

Token layout of a step: sequences are packed back to back. The first `num_decodes` sequences are in
the recurrent part (decode, or speculative verify) and each has exactly `decode_query_len` = 1 + k
tokens; the rest are prefill chunks of any length. Attention treats both parts alike.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from worker.kernels.decode_metadata import PAD_SLOT  # noqa: F401 (the one definition; layers import it from here)


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # [B+1] int32, query starts per sequence
    context_lens: torch.Tensor  # [B] int32, KV length of each sequence once this step's tokens are written
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot (block * block_size + offset) per token, PAD_SLOT to skip
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_seqlen_q: int
    max_context_len: int


@dataclass
class GDNMetadata:
    """Which GDN state slots each sequence reads and writes.

    A sequence owns a slot group: one conv state `[conv_dim, K-1+k]` and 1+k recurrent states.
    The state to start from is recurrent slot `num_accepted - 1` of the group, and the conv window
    starts at column `num_accepted - 1`. Decodes write the state after every position j into slot j;
    prefill chunks write their final state into slot 0.
    """

    num_decodes: int
    decode_query_len: int
    state_indices: torch.Tensor  # [B] int64 slot group per sequence, PAD_SLOT to skip
    num_accepted: torch.Tensor  # [B] int64 in 1..1+k
    has_initial_state: torch.Tensor  # [B] bool; False: start from zeros (a new sequence)
    prefill_cu_seqlens: torch.Tensor  # [B - num_decodes + 1] int32, query starts of the prefill part from 0

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes * self.decode_query_len


@dataclass
class StepContext:
    attn: AttentionMetadata
    gdn: GDNMetadata | None = None
    # The attention of a pass whose layers output some rows only (DecoderLayer's `output_rows`, the MTP's
    # first pass): one query row per sequence, those rows' context lengths. Every row still writes its KV
    # (`attn.slot_mapping`); None: every row attends and the rows are picked after.
    output_attn: AttentionMetadata | None = None


_CONTEXT: StepContext | None = None


def get_context() -> StepContext:
    if _CONTEXT is None:
        raise RuntimeError("model called outside forward_context(); the runner must set the step metadata")
    return _CONTEXT


@contextmanager
def forward_context(ctx: StepContext):
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
