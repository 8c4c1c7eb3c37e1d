"""Draft proposers for speculative decoding.

After the target has run a step, each sequence has an *anchor*: the row of its last accepted
position and the token that follows it (the correction / bonus token, the freshly sampled token,
or the next prompt token of an unfinished prefill chunk). A proposer returns k draft tokens per
sampled sequence. One with `drafts_in_graph` also drafts from device tensors alone (`draft`), so the
decode graphs capture its drafting and a decode step can be planned ahead of the one in flight.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from worker.engine.host_io import index_tensor, to_device
from worker.engine.plan import StepPlan
from worker import kernels
from worker.model.context import PAD_SLOT, AttentionMetadata, StepContext, forward_context, get_context
from worker.model.layers.embedding import DraftVocabHead


@dataclass
class ProposalInputs:
    plan: StepPlan
    ctx: StepContext  # the target step's metadata (the MTP layer reuses its attention part; slot groups)
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    hidden_states: torch.Tensor  # [T, H] target hidden states after the final norm
    anchor_rows: torch.Tensor  # [B] row (into T) of each sequence's last accepted position
    anchor_next_ids: torch.Tensor  # [B] the token that follows that position
    sampled: list[int]  # indices into plan.sequences that get drafts
    emitted: Callable[[], list[list[int]]]  # host copy of the tokens emitted per sequence (syncs)


class Proposer(Protocol):
    num_spec_tokens: int
    drafts_in_graph: bool  # also has `draft(...)` (MTPProposer.draft's signature), from device tensors alone

    def propose(self, inputs: ProposalInputs) -> torch.Tensor:  # [len(sampled), k] int64
        ...


class MTPProposer:
    """Drafts with the model's MTP head, greedily (a point-mass draft); with `token_map` (a draft
    vocabulary, worker.engine.token_map) the best token among those ids.

    Pass 1 runs the MTP's attention over every row the target ran (so its KV cache stays complete),
    reading for row i the token after position i; rows past a rejection read garbage but only write KV
    at positions the next step overwrites. Only the anchor rows' queries attend, and only they go on
    through its MLP. Further drafts chain the MTP on its own post-norm output.
    """

    drafts_in_graph = True

    def __init__(self, model, num_spec_tokens: int, block_size: int, token_map: torch.Tensor | None = None):
        if model.mtp is None:
            raise ValueError("speculative_tokens > 0 needs MTP weights (mtp.* tensors) in the checkpoint")
        self.model = model
        self.num_spec_tokens = num_spec_tokens
        self.block_size = block_size
        self.draft_head = None if token_map is None else DraftVocabHead(model.lm_head, token_map)
        self._row_bounds: dict[torch.device, torch.Tensor] = {}  # see _cu_seqlens

    def propose(self, inputs: ProposalInputs) -> torch.Tensor:
        sampled = None
        if inputs.sampled != list(range(len(inputs.plan.sequences))):
            sampled = index_tensor(inputs.sampled, inputs.input_ids.device)
        return self.draft(inputs.ctx.attn, inputs.input_ids, inputs.positions, inputs.hidden_states,
                          inputs.anchor_rows, inputs.anchor_next_ids, sampled)

    def draft(self, attn: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor,
              hidden_states: torch.Tensor, anchor_rows: torch.Tensor, anchor_next_ids: torch.Tensor,
              sampled: torch.Tensor | None = None, row_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The drafts [len(sampled), k] of the sequences `sampled` (indices into the step's sequences;
        None: every one, in order), from tensors alone, so a CUDA graph can hold it. `row_valid`
        [len(sampled)] bool marks padded sequences (False), whose chained passes then write no KV."""
        next_ids = torch.roll(input_ids, -1)
        next_ids[anchor_rows] = anchor_next_ids
        rows = anchor_rows if sampled is None else anchor_rows[sampled]
        block_tables = attn.block_tables if sampled is None else attn.block_tables[sampled]
        cu_seqlens = self._cu_seqlens(rows.shape[0], rows.device)
        # The anchor rows alone attend (every row writes its KV), then go on through the MLP and the norm after it.
        ctx = StepContext(attn, output_attn=self._anchor_metadata(attn, rows, sampled, block_tables, cu_seqlens))
        with forward_context(ctx):
            hidden = self.model.forward_mtp(next_ids, positions, hidden_states, output_rows=rows)
        drafts = [self._best_token(hidden)]
        if self.num_spec_tokens == 1:
            return drafts[0][:, None]
        positions = positions[rows]
        for step in range(1, self.num_spec_tokens):
            positions = positions + 1
            ctx = StepContext(self._single_row_metadata(positions, block_tables, cu_seqlens,
                                                        attn.max_context_len + step, row_valid))
            with forward_context(ctx):
                hidden = self.model.forward_mtp(drafts[-1], positions, hidden, step)
            drafts.append(self._best_token(hidden))
        return torch.stack(drafts, dim=1)

    def _best_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's greedy draft per row: over the whole vocabulary, or over the draft vocabulary."""
        if self.draft_head is None:
            return kernels.argmax(self.model.compute_logits(hidden))
        return self.draft_head.token_ids[kernels.argmax(self.draft_head(hidden))]

    def _cu_seqlens(self, num_seqs: int, device: torch.device) -> torch.Tensor:
        """0, 1, .., num_seqs (int32), one query row per sequence: built once per device (and again only when a
        batch outgrows it), then sliced, so the chained passes build nothing for it."""
        bounds = self._row_bounds.get(device)
        if bounds is None or bounds.shape[0] <= num_seqs:
            bounds = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
            self._row_bounds[device] = bounds
        return bounds[: num_seqs + 1]

    @staticmethod
    def _anchor_metadata(attn: AttentionMetadata, rows: torch.Tensor, sampled: torch.Tensor | None,
                         block_tables: torch.Tensor, cu_seqlens: torch.Tensor) -> AttentionMetadata:
        """The first pass's attention of the anchor rows alone: row r of sequence s sees the keys up to its
        position, the step's context length of s less the rows of s after r."""
        ends, context_lens = attn.cu_seqlens_q[1:], attn.context_lens
        if sampled is not None:
            ends, context_lens = ends[sampled], context_lens[sampled]
        return AttentionMetadata(
            cu_seqlens_q=cu_seqlens,
            context_lens=(context_lens - (ends - 1 - rows)).to(torch.int32),
            slot_mapping=attn.slot_mapping,  # unread: the KV of every row is written with the step's metadata
            block_tables=block_tables,
            max_seqlen_q=1,
            max_context_len=attn.max_context_len,
        )

    def _single_row_metadata(self, positions: torch.Tensor, block_tables: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_context_len: int, row_valid: torch.Tensor | None) -> AttentionMetadata:
        _, slots, context_lens = kernels.decode_metadata(positions, block_tables, row_valid, 1, self.block_size)
        return AttentionMetadata(
            cu_seqlens_q=cu_seqlens,
            context_lens=context_lens,
            slot_mapping=slots.view(-1),
            block_tables=block_tables,
            max_seqlen_q=1,
            max_context_len=max_context_len,  # the target step's bound plus the chained steps
        )


class ScriptedProposer:
    """Drafts from a function of the token history, for tests: `script(request_id, tokens, k) -> k ids`.

    Tracks each request's tokens from the plans and the emitted tokens, so a script can propose the
    true continuation (accept-all), a wrong first token (reject-first), or anything in between.
    """

    drafts_in_graph = False  # it needs the step's emitted tokens on the host

    def __init__(self, script: Callable[[str, list[int], int], list[int]], num_spec_tokens: int):
        self.script = script
        self.num_spec_tokens = num_spec_tokens
        self.history: dict[str, list[int]] = {}

    def propose(self, inputs: ProposalInputs) -> torch.Tensor:
        emitted = inputs.emitted()
        for r in inputs.plan.finished_request_ids:
            self.history.pop(r, None)
        for i, entry in enumerate(inputs.plan.sequences):
            known = self.history.get(entry.request_id, [])[: entry.start_position]
            fed = entry.token_ids[:1] if entry.is_decode else entry.token_ids
            self.history[entry.request_id] = known + fed + emitted[i]
        drafts = []
        for i in inputs.sampled:
            request_id = inputs.plan.sequences[i].request_id
            proposal = list(self.script(request_id, list(self.history[request_id]), self.num_spec_tokens))
            if len(proposal) != self.num_spec_tokens:
                raise ValueError(f"script proposed {len(proposal)} tokens, expected {self.num_spec_tokens}")
            drafts.append(proposal)
        return torch.tensor(drafts, dtype=torch.long, device=inputs.input_ids.device).view(-1, self.num_spec_tokens)


FALLBACK_TOKEN = 0  # what an unknown row or position drafts: a valid id, which verification may reject


class KnownTokensProposer:
    """Drafts each request's known tokens from a device table, so the decode graphs capture its drafting
    like the MTP head's: with a greedy run's own output as the known tokens, every draft is accepted
    (the upper bound of speculative decoding, without host work in the step).

    `known[request_id]` is a request's whole token sequence, prompt then continuation. It is read when
    the request's prefill ends (so entries may be added until then) and written into the table row of
    the request's GDN slot group, a per-row id the decode graphs' static buffers already hold. The
    draft j of a row whose last accepted position is p is the known token at p + 2 + j (the anchor
    token is the one at p + 1). Unknown requests, padded rows and positions past the table draft
    FALLBACK_TOKEN.
    """

    drafts_in_graph = True

    def __init__(self, known: Mapping[str, list[int]], num_spec_tokens: int, max_num_seqs: int,
                 max_len: int, device: torch.device | str):
        """Slot groups are below max_num_seqs (the cache plan holds at most that many); the table holds
        positions 0 .. max_len-1."""
        self.known = known
        self.num_spec_tokens = num_spec_tokens
        self.max_len = max_len
        self.unknown_row = max_num_seqs  # every slot group outside the table reads this row of FALLBACK_TOKEN
        self.tokens = torch.full((max_num_seqs + 1, max_len), FALLBACK_TOKEN, dtype=torch.int64, device=device)
        self._offsets = torch.arange(2, 2 + num_spec_tokens, device=device)

    def propose(self, inputs: ProposalInputs) -> torch.Tensor:
        self.write_rows(inputs.plan)
        sampled = index_tensor(inputs.sampled, inputs.input_ids.device)
        groups = inputs.ctx.gdn.state_indices[sampled]
        return self._known_after(groups, inputs.positions[inputs.anchor_rows[sampled]])

    def write_rows(self, plan: StepPlan) -> None:
        """Write the known tokens of the requests whose prefill ends in `plan` into their slot groups' rows
        (a group freed and taken again gets its new request's tokens)."""
        ending = [entry for entry in plan.sequences if not entry.is_decode and entry.sample]
        if not ending:
            return
        rows = []
        for entry in ending:
            if not 0 <= entry.state_group < self.unknown_row:
                raise ValueError(f"slot group {entry.state_group} is outside the table of {self.unknown_row} rows")
            tokens = list(self.known.get(entry.request_id, ()))[: self.max_len]
            rows.append(tokens + [FALLBACK_TOKEN] * (self.max_len - len(tokens)))
        device = self.tokens.device
        groups = index_tensor([entry.state_group for entry in ending], device)
        self.tokens.index_copy_(0, groups, to_device(rows, torch.int64, device))

    def draft(self, attn: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor,
              hidden_states: torch.Tensor, anchor_rows: torch.Tensor, anchor_next_ids: torch.Tensor,
              sampled: torch.Tensor | None = None, row_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The drafts [len(sampled), k], as MTPProposer.draft; the rows' slot groups come from the step's
        context (get_context().gdn), which the caller sets."""
        groups, rows = get_context().gdn.state_indices, anchor_rows
        if sampled is not None:
            groups, rows = groups[sampled], rows[sampled]
        if row_valid is not None:
            groups = torch.where(row_valid, groups, PAD_SLOT)
        return self._known_after(groups, positions[rows])

    def _known_after(self, groups: torch.Tensor, last_positions: torch.Tensor) -> torch.Tensor:
        """[R] slot groups, [R] last accepted positions -> [R, k] the known tokens 2.. positions on."""
        in_table = (groups >= 0) & (groups < self.unknown_row)
        rows = torch.where(in_table, groups, self.unknown_row)
        at = last_positions[:, None] + self._offsets  # [R, k]
        in_range = (at >= 0) & (at < self.max_len)
        tokens = self.tokens[rows[:, None], at.clamp(0, self.max_len - 1)]
        return torch.where(in_range, tokens, FALLBACK_TOKEN)
