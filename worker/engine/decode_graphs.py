"""Decode and verify steps on static buffers, replayed as CUDA graphs per batch-size bucket.

A decode-only step (every sequence feeds its last token and its k drafts) whose requests need no
penalties or min_tokens masking runs here: the target's (1+k)·B positions, sampling or draft
verification, logprobs (the top MAX_LOGPROBS, cut to what each request asked on the host), and the
drafts of a proposer that drafts in the graph (the MTP head's chained drafts, or known tokens), all
read from static buffers. The host
writes one packed int64 and one fp32 vector of inputs and the used columns of the block tables into
pinned memory, copies them without blocking, draws the step's uniforms (so seeded requests keep
their own streams), and replays the graph of the smallest bucket that holds the batch.

Padded rows are invalid: their KV slots and GDN state groups are PAD, so no kernel writes a real
sequence's cache or state, and they attend to Q keys of block 0, which keeps them finite.
Without graphs (CPU, `enforce_eager`) the same function runs on the same padded buffers, so a batch
gives the same bits either way.
"""

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from worker import kernels
from worker.engine.plan import ScheduledSequence
from worker.engine.sampler import RequestSampling, draw_uniforms, sampling_columns
from worker.engine.sampling_ops import RowSamplingParams, token_logprobs, verify_batch
from worker.engine.sampling_params import MAX_LOGPROBS
from worker.engine.host_io import index_tensor
from worker.model.context import PAD_SLOT, AttentionMetadata, GDNMetadata, StepContext, forward_context

logger = logging.getLogger(__name__)

BUCKET_STEP = 8  # buckets 1, 2, 4, 8, then every 8
INT_FIELDS = ("start", "state", "accepted", "valid", "top_k", "greedy")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")
VARIANTS = [(greedy_only, with_logprobs) for greedy_only in (True, False) for with_logprobs in (False, True)]
PAD_ROW = dict(start=0, state=PAD_SLOT, accepted=1, valid=0, greedy=1, temperature=1.0, top_p=1.0, min_p=0.0)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to the first bucket that holds max_num_seqs."""
    buckets, size = [], 1
    while size < max_num_seqs and size < BUCKET_STEP:
        buckets.append(size)
        size *= 2
    size = min(size, BUCKET_STEP)
    while True:
        buckets.append(size)
        if size >= max_num_seqs:
            return buckets
        size += BUCKET_STEP


def graph_compatible(rows: list[RequestSampling], extra_outputs: int = 0) -> bool:
    """Rows whose sampling needs nothing but their parameters (no penalties, no min_tokens masking),
    counting `extra_outputs` tokens not yet recorded (a step planned ahead)."""
    return all(not row.params.has_penalties
               and (row.num_output_tokens + extra_outputs >= row.params.min_tokens or not row.min_tokens_stop_ids)
               for row in rows)


@dataclass
class DecodeResult:
    token_ids: torch.Tensor  # [bucket, Q] emitted tokens, padded with -1
    num_accepted: torch.Tensor  # [bucket]
    drafts: torch.Tensor | None  # [bucket, k] from the graph's proposer, None without one
    ctx: StepContext
    input_ids: torch.Tensor  # [bucket * Q]
    positions: torch.Tensor
    hidden_states: torch.Tensor  # [bucket * Q, H]
    logprobs: torch.Tensor | None = None  # [bucket, Q] of the emitted tokens (0 past them), with_logprobs only
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # ([bucket, Q, MAX_LOGPROBS] values, ids)


class DecodeGraphs:
    def __init__(self, model, proposer, num_spec_tokens: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, sizes: tuple[int, ...] | None = None):
        """`proposer`: one with drafts_in_graph, whose `draft` each step runs, or None (no drafts here)."""
        self.model = model
        self.proposer = proposer
        self.q_len = 1 + num_spec_tokens
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.buckets = batch_buckets(max_num_seqs) if sizes is None else [s for s in sizes if s <= max_num_seqs]
        if not self.buckets:
            raise ValueError(f"no CUDA-graph size in {list(sizes)} is at most max_num_seqs = {max_num_seqs}")
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-(max_model_len + num_spec_tokens) // block_size)
        self.vocab_size = model.config.vocab_size
        self.graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, DecodeResult]] = {}
        self.num_replays = 0  # steps run by replaying a graph
        self.num_eager_steps = 0  # steps run by calling `step` (no graph, or none captured for the bucket)
        self._allocate_buffers()

    def _allocate_buffers(self) -> None:
        m, q, dev = self.max_batch, self.q_len, self.device
        pin = dev.type == "cuda"
        self.offsets = {"input_ids": 0}
        for i, name in enumerate(INT_FIELDS):
            self.offsets[name] = m * q + i * m
        self.offsets.update({name: i * m for i, name in enumerate(FLOAT_FIELDS)})
        # Every step's inputs in one byte buffer: the int64 fields, the float32 fields, then the block
        # tables packed to the step's widest row (int32), so one copy moves them from the host.
        num_ints, num_floats = m * q + len(INT_FIELDS) * m, len(FLOAT_FIELDS) * m
        self._floats_at, self._tables_at = num_ints * 8, num_ints * 8 + num_floats * 4
        size = self._tables_at + m * self.max_blocks * 4
        self.inputs = torch.zeros(size, dtype=torch.uint8, device=dev)
        self.ints, self.floats, self.tables_stage = self._views(self.inputs)
        # Two pinned copies, used in turn: with a step planned ahead, the host fills one while the copy
        # from the other may still be queued.
        self._host_sets = [torch.zeros(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._host_arrays = [tuple(view.numpy() for view in self._views(host)) for host in self._host_sets]
        self._num_writes = 0  # the set in use: _num_writes % 2
        self.tables = torch.zeros(m, self.max_blocks, dtype=torch.int32, device=dev)
        self.uniforms = torch.zeros(m, q, dtype=torch.float32, device=dev)
        self.cu_seqlens = torch.arange(m + 1, dtype=torch.int32, device=dev) * q
        self.row_starts = torch.arange(m, dtype=torch.int64, device=dev) * q
        self.has_initial_state = torch.ones(m, dtype=torch.bool, device=dev)
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=dev)

    def _views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ints, floats, packed tables) of an inputs buffer."""
        ints = buffer[: self._floats_at].view(torch.int64)
        floats = buffer[self._floats_at : self._tables_at].view(torch.float32)
        return ints, floats, buffer[self._tables_at :].view(torch.int32)

    def _copy_inputs(self, num_table_values: int) -> None:
        """Queue the copy of the host inputs' fields and first `num_table_values` table entries."""
        end = self._tables_at + num_table_values * 4
        self.inputs[:end].copy_(self._host_sets[self._num_writes % 2][:end], non_blocking=True)

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def graph_for(self, num_seqs: int, greedy_only: bool = True, with_logprobs: bool = False):
        """The captured graph a batch of num_seqs replays (None: not captured), for profiling."""
        captured = self.graphs.get((self.bucket_for(num_seqs), greedy_only, with_logprobs))
        return None if captured is None else captured[0]

    def can_run(self, sequences: list[ScheduledSequence], rows: list[RequestSampling], extra_outputs: int = 0) -> bool:
        return (bool(sequences) and all(s.is_decode for s in sequences) and len(sequences) <= self.max_batch
                and graph_compatible(rows, extra_outputs))

    # -- host side ----------------------------------------------------------------------------

    def _write_inputs(self, sequences: list[ScheduledSequence], rows: list[RequestSampling], bucket: int) -> None:
        """Fill the pinned inputs for `bucket` rows (the real ones, then padding) and queue their copy."""
        self._num_writes += 1
        n, q = len(sequences), self.q_len
        ints, floats, tables_host = self._host_arrays[self._num_writes % 2]
        pad = bucket - n
        ids = [t for s in sequences for t in s.token_ids]
        ints[: bucket * q] = ids + [0] * (pad * q)
        sampling = sampling_columns(rows, self.vocab_size)
        columns = dict(
            start=[s.start_position for s in sequences], state=[s.state_group for s in sequences],
            accepted=[s.num_accepted_slot for s in sequences], valid=[1] * n, top_k=sampling["top_k"],
            greedy=[int(g) for g in sampling["is_greedy"]], temperature=sampling["temperature"],
            top_p=sampling["top_p"], min_p=sampling["min_p"],
        )
        for name, values in columns.items():
            target = floats if name in FLOAT_FIELDS else ints
            off = self.offsets[name]
            target[off : off + bucket] = values + [PAD_ROW.get(name, self.vocab_size)] * pad
        num_cols = max(len(s.block_table) for s in sequences)
        tables = tables_host[: bucket * num_cols].reshape(bucket, num_cols)
        tables[:] = 0
        for i, s in enumerate(sequences):
            tables[i, : len(s.block_table)] = s.block_table
        self._copy_inputs(bucket * num_cols)
        self.tables[:bucket, :num_cols].copy_(self.tables_stage[: bucket * num_cols].view(bucket, num_cols))

    def _write_uniforms(self, rows: list[RequestSampling], generator: torch.Generator) -> None:
        """The uniforms the eager sampler would draw, in its order, for the rows that sample."""
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if sampled:
            draws = draw_uniforms([rows[i] for i in sampled], self.q_len, self.device, generator)
            self.uniforms.index_copy_(0, index_tensor(sampled, self.device), draws)

    def run(self, sequences: list[ScheduledSequence], rows: list[RequestSampling], generator: torch.Generator,
            previous: DecodeResult | None = None) -> DecodeResult:
        """One step. With `previous` (the step still in flight, whose sequences these are, in order),
        each sequence's tokens, start position and state slot come from its results on the device."""
        bucket = self.bucket_for(len(sequences))
        greedy_only = all(row.params.is_greedy for row in rows)
        with_logprobs = any(row.params.logprobs is not None for row in rows)
        self._write_inputs(sequences, rows, bucket)
        if previous is not None:
            self._continue_from(previous, len(sequences))
        if not greedy_only:
            self._write_uniforms(rows, generator)
        graph = self.graphs.get((bucket, greedy_only, with_logprobs))
        if graph is None:
            self.num_eager_steps += 1
            return self.step(bucket, greedy_only, with_logprobs)
        graph[0].replay()
        self.num_replays += 1
        return graph[1]

    def _continue_from(self, previous: DecodeResult, num_seqs: int) -> None:
        """Inputs of the step after `previous`, on the device: the token after the accepted drafts, the
        new drafts, a start num_accepted + 1 further on, and the state slot after the last accepted."""
        n, q = num_seqs, self.q_len
        kernels.continue_decode_inputs(
            previous.token_ids[:n], previous.num_accepted[:n], None if previous.drafts is None else previous.drafts[:n],
            previous.positions.view(-1, q)[:n], self.ints[: n * q], self._field("start", n), self._field("accepted", n))

    # -- device side (captured) ---------------------------------------------------------------

    def _field(self, name: str, bucket: int) -> torch.Tensor:
        buffer = self.floats if name in FLOAT_FIELDS else self.ints
        off = self.offsets[name]
        return buffer[off : off + bucket]

    def _context(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, StepContext, torch.Tensor]:
        q = self.q_len
        input_ids = self.ints[: bucket * q]
        valid = self._field("valid", bucket) != 0
        tables = self.tables[:bucket]
        positions, slots, context_lens = kernels.decode_metadata(self._field("start", bucket), tables, valid, q,
                                                                 self.block_size)
        attn = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: bucket + 1], context_lens=context_lens,
            slot_mapping=slots.reshape(-1), block_tables=tables, max_seqlen_q=q,
            max_context_len=self.max_model_len,
        )
        gdn = GDNMetadata(
            num_decodes=bucket, decode_query_len=q, state_indices=self._field("state", bucket),
            num_accepted=self._field("accepted", bucket), has_initial_state=self.has_initial_state[:bucket],
            prefill_cu_seqlens=self.no_prefill,
        )
        return input_ids, positions.reshape(-1), StepContext(attn, gdn), valid

    def _sampling_params(self, bucket: int) -> RowSamplingParams:
        return RowSamplingParams(
            is_greedy=self._field("greedy", bucket) != 0, temperature=self._field("temperature", bucket),
            top_k=self._field("top_k", bucket), top_p=self._field("top_p", bucket),
            min_p=self._field("min_p", bucket),
        )

    def step(self, bucket: int, greedy_only: bool, with_logprobs: bool = False) -> DecodeResult:
        """One decode / verify step of `bucket` rows, from the static buffers alone."""
        input_ids, positions, ctx, valid = self._context(bucket)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        logits = self.model.compute_logits(hidden).view(bucket, self.q_len, -1)
        draft_ids = input_ids.view(bucket, self.q_len)[:, 1:]
        params = None if greedy_only else self._sampling_params(bucket)
        uniforms = None if greedy_only else self.uniforms[:bucket]
        token_ids, num_accepted = verify_batch(logits, draft_ids, params, uniforms)
        logprobs = top = None
        if with_logprobs:
            logprobs, top = token_logprobs(logits.view(bucket * self.q_len, -1).float(), token_ids.view(-1),
                                           MAX_LOGPROBS)
            logprobs = logprobs.view(bucket, self.q_len)
            top = tuple(t.view(bucket, self.q_len, MAX_LOGPROBS) for t in top)
        drafts = None
        if self.proposer is not None:
            anchor_rows = self.row_starts[:bucket] + num_accepted
            anchor_next = token_ids.gather(1, num_accepted[:, None]).squeeze(1)
            with forward_context(ctx):  # a proposer may read the step's metadata (the rows' slot groups)
                drafts = self.proposer.draft(ctx.attn, input_ids, positions, hidden, anchor_rows, anchor_next,
                                             row_valid=valid)
        return DecodeResult(token_ids, num_accepted, drafts, ctx, input_ids, positions, hidden, logprobs, top)

    # -- capture ------------------------------------------------------------------------------

    def _write_padding(self) -> None:
        """Every row padding: what capture runs on (it must not touch a real cache)."""
        ints, floats, _ = self._host_arrays[self._num_writes % 2]
        ints[:] = 0
        for name in INT_FIELDS:
            ints[self.offsets[name] : self.offsets[name] + self.max_batch] = PAD_ROW.get(name, self.vocab_size)
        for name in FLOAT_FIELDS:
            floats[self.offsets[name] : self.offsets[name] + self.max_batch] = PAD_ROW[name]
        self._copy_inputs(0)
        self.tables.zero_()
        self.uniforms.fill_(0.5)

    def capture(self, progress: bool = True) -> None:
        """Capture every (bucket, greedy or sampling, with or without logprobs) graph, the largest first so
        the rest reuse its pool."""
        started, before = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        self._write_padding()
        pool = torch.cuda.graph_pool_handle()
        keys = [(b, *variant) for b in reversed(self.buckets) for variant in VARIANTS]
        side = _warmup_stream(self.device)
        for key in tqdm(keys, desc="capturing CUDA graphs", unit="graph", disable=not progress):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, sets up cuBLAS, off the capture
                warm = self.step(*key)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                result = self.step(*key)
            self.graphs[key] = (graph, result)
        self._warm_continuation(warm, keys[-1][0])
        torch.cuda.synchronize(self.device)
        used = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d CUDA graphs (batch buckets %s, %d tokens each) in %.1f s, %.1f MiB",
                    len(self.graphs), _ranges(self.buckets), self.q_len, time.perf_counter() - started, used / 2**20)

    def _warm_continuation(self, warm: DecodeResult, bucket: int) -> None:
        """Run the continuation kernel once on an eager warm-up step's results, so that the first step
        planned ahead of the one in flight does not wait for its compilation (0.38 s on an H200); then
        the padding inputs again."""
        self._continue_from(warm, bucket)
        self._write_padding()

    def release(self) -> None:
        self.graphs.clear()

    def profile_memory(self) -> int:
        """Bytes the largest bucket's steps hold at their peak, above what is allocated now (CUDA)."""
        self._write_padding()
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        for variant in VARIANTS:
            self.step(self.max_batch, *variant)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the whole process: cuBLAS keeps a workspace per stream for good."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def _ranges(buckets: list[int]) -> str:
    return ", ".join(map(str, buckets)) if len(buckets) <= 8 else f"{', '.join(map(str, buckets[:6]))}, ... {buckets[-1]}"
