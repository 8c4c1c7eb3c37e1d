"""Continuous batching: decodes first, then prefill chunks, FCFS admission, preemption by recompute.

Pure Python over sequences and integer cache ids. With k speculative tokens a decode feeds
[last token, d1..dk]; the KV blocks it holds must also cover the MTP's chained drafts (k-1 more).
"""

from collections import deque
from dataclasses import dataclass, field

from worker.engine.cache_manager import CacheManager
from worker.engine.plan import NewRequest, ScheduledSequence, StepOutput, StepPlan
from worker.engine.sequence import FinishReason, Sequence, SequenceStatus

PENDING_TOKEN = -1  # in a step planned ahead: the token the step in flight is sampling


@dataclass
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_spec_tokens: int = 0
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not 0 <= self.num_spec_tokens <= 8:
            raise ValueError(f"speculative_tokens must be in 0..8, got {self.num_spec_tokens}")
        if self.max_num_batched_tokens < 1 + self.num_spec_tokens:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= 1 + "
                             f"speculative_tokens ({1 + self.num_spec_tokens})")

    @property
    def decode_query_len(self) -> int:
        return 1 + self.num_spec_tokens

    @property
    def lookahead(self) -> int:
        """Positions past the fed tokens that the MTP's chained drafts write KV for."""
        return max(self.num_spec_tokens - 1, 0)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager):
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._sequences: dict[str, Sequence] = {}
        self._pending_aborts: set[str] = set()
        self._new_requests: list[NewRequest] = []
        self._retired_ids: list[str] = []
        self._step_id = 0
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._sequences:
            raise ValueError(f"request_id {seq.request_id!r} is already in the engine")
        self.check_fits(len(seq.prompt_token_ids))
        seq.arrival_index = self._arrivals
        self._arrivals += 1
        self._sequences[seq.request_id] = seq
        if seq.request_id in self._retired_ids:  # an id reused before the runner heard of the old one's end
            self._retired_ids.remove(seq.request_id)
        self._new_requests.append(NewRequest(seq.request_id, seq.prompt_token_ids, seq.params))
        self.waiting.append(seq)

    def check_fits(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise ValueError("prompt must have at least one token")
        if num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; the model's maximum length is "
                             f"{self.config.max_model_len} (prompt plus at least one generated token)")
        capacity = self.cache.num_blocks * self.cache.block_size
        if num_prompt_tokens + self.config.decode_query_len + self.config.lookahead > capacity:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; the KV cache holds {capacity} in all")

    def abort(self, request_id: str) -> bool:
        """Takes effect at the next step boundary. False if the request is unknown or finished."""
        if request_id not in self._sequences:
            return False
        self._pending_aborts.add(request_id)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self._sequences)

    def get(self, request_id: str) -> Sequence | None:
        return self._sequences.get(request_id)

    def apply_aborts(self) -> list[Sequence]:
        aborted = [self._sequences[r] for r in self._pending_aborts if r in self._sequences]
        self._pending_aborts.clear()
        for seq in aborted:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._finish(seq, FinishReason.ABORT)
        return aborted

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSequence] = []
        prefills: list[ScheduledSequence] = []
        scheduled: set[str] = set()
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or self._needs_prefill(seq):
                continue
            num_tokens = self.config.decode_query_len
            if num_tokens > budget or not self._make_room(seq, seq.num_computed_tokens + num_tokens, scheduled):
                continue
            decodes.append(self._decode_entry(seq))
            scheduled.add(seq.request_id)
            budget -= num_tokens
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING or not self._needs_prefill(seq) or seq.request_id in scheduled:
                continue
            entry = self._prefill_entry(seq, budget, scheduled, preempt=True)
            if entry:
                prefills.append(entry)
                scheduled.add(seq.request_id)
                budget -= len(entry.token_ids)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            entry = self._prefill_entry(seq, budget, scheduled, preempt=False)
            if entry is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(entry)
            scheduled.add(seq.request_id)
            budget -= len(entry.token_ids)
        self._step_id += 1
        plan = StepPlan(self._step_id, decodes + prefills, self._new_requests, self._retired_ids)
        self._new_requests, self._retired_ids = [], []
        return plan

    def schedule_ahead(self, plan: StepPlan) -> StepPlan | None:
        """The step after `plan`, planned before `plan`'s tokens are known: each of its decodes feeds the
        token `plan` is sampling for it, one position further (the runner takes it on the device). None
        when the next step cannot be known yet: waiting requests or aborts, a sequence that `plan` leaves
        out or may finish by length, or too few free blocks (no preemption).

        With k speculative tokens the step feeds the correction or bonus token and the k new drafts,
        from a position that depends on how many drafts `plan` accepts: start_position and
        num_accepted_slot here assume none, and the runner sets both on the device. Blocks are
        allocated for the most `plan` can accept."""
        if self.waiting or self._pending_aborts or not plan.sequences:
            return None
        q = self.config.decode_query_len
        seqs = [self._sequences.get(entry.request_id) for entry in plan.sequences]
        if len(seqs) != len(self.running) or any(
                seq is None or not entry.is_decode or self._may_end_by_length(seq, q)
                for entry, seq in zip(plan.sequences, seqs)):
            return None
        reach = q + q + self.config.lookahead  # plan's tokens, this step's, the MTP's chained drafts
        needed = sum(self.cache.blocks_needed(seq, seq.num_computed_tokens + reach) for seq in seqs)
        if needed > self.cache.num_free_blocks:
            return None
        entries = []
        for seq in seqs:
            self.cache.allocate(seq, seq.num_computed_tokens + reach)
            entries.append(ScheduledSequence(
                request_id=seq.request_id, token_ids=[PENDING_TOKEN] * q, start_position=seq.num_computed_tokens + 1,
                block_table=list(seq.block_table), state_group=seq.state_group, num_accepted_slot=1, is_decode=True,
                sample=True))
        self._step_id += 1
        ahead = StepPlan(self._step_id, entries, self._new_requests, self._retired_ids)
        self._new_requests, self._retired_ids = [], []
        return ahead

    def _needs_prefill(self, seq: Sequence) -> bool:
        """Prefilling, or, with drafts, left with only its last prompt token by a chunk that sampled
        nothing: a decode needs k drafts, so that token goes as a one-token last chunk, which drafts."""
        return seq.is_prefilling or (self.config.num_spec_tokens > 0 and not seq.draft_token_ids)

    def _may_end_by_length(self, seq: Sequence, num_new: int) -> bool:
        return (len(seq.output_token_ids) + num_new >= seq.params.max_tokens
                or seq.num_tokens + num_new >= self.config.max_model_len)

    def _decode_entry(self, seq: Sequence) -> ScheduledSequence:
        drafts = seq.draft_token_ids[: self.config.num_spec_tokens]
        if len(drafts) != self.config.num_spec_tokens:
            raise RuntimeError(f"request {seq.request_id}: {len(drafts)} drafts, expected {self.config.num_spec_tokens}")
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=[seq.last_token_id, *drafts],
            start_position=seq.num_computed_tokens,
            block_table=list(seq.block_table),
            state_group=seq.state_group,
            num_accepted_slot=seq.num_accepted_slot,
            is_decode=True,
            sample=True,
        )

    def _prefill_entry(self, seq: Sequence, budget: int, scheduled: set[str], preempt: bool):
        start = seq.num_computed_tokens
        num_tokens = min(seq.num_uncomputed_tokens, budget)
        is_last_chunk = start + num_tokens == seq.num_tokens
        needed = start + num_tokens + (self.config.lookahead if is_last_chunk else 0)
        if preempt:
            if not self._make_room(seq, needed, scheduled):
                return None
        elif not self.cache.can_allocate(seq, needed):
            return None
        else:
            self.cache.allocate(seq, needed)
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=seq.token_ids_between(start, start + num_tokens),
            start_position=start,
            block_table=list(seq.block_table),
            state_group=seq.state_group,
            num_accepted_slot=seq.num_accepted_slot,
            is_decode=False,
            sample=is_last_chunk,
            next_token_id=None if is_last_chunk else seq.token_at(start + num_tokens),
        )

    def _make_room(self, seq: Sequence, num_positions: int, scheduled: set[str]) -> bool:
        """Allocate for seq, preempting the latest-arrived unscheduled running sequences if needed."""
        while not self.cache.can_allocate(seq, num_positions):
            victims = [s for s in self.running if s.request_id not in scheduled and s is not seq]
            if not victims:
                self._preempt(seq)
                return False
            self._preempt(max(victims, key=lambda s: s.arrival_index))
        self.cache.allocate(seq, num_positions)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        # Back at the head of the queue, in arrival order among the preempted.
        position = 0
        while position < len(self.waiting) and self.waiting[position].num_preemptions and \
                self.waiting[position].arrival_index < seq.arrival_index:
            position += 1
        self.waiting.insert(position, seq)

    def update(self, plan: StepPlan, output: StepOutput) -> list[tuple[Sequence, int]]:
        """Apply a step's results. -> (sequence, number of new output tokens) for every sequence that moved."""
        changed = []
        for entry, result in zip(plan.sequences, output.sequences):
            seq = self._sequences.get(entry.request_id)
            if seq is None or seq.is_finished:
                continue
            if entry.is_decode:
                seq.num_computed_tokens += 1 + result.num_accepted_drafts
                seq.num_accepted_slot = 1 + result.num_accepted_drafts
                if entry.num_drafts:
                    seq.spec.record(entry.num_drafts, result.num_accepted_drafts)
            else:
                seq.num_computed_tokens += len(entry.token_ids)
                seq.num_accepted_slot = 1
            seq.draft_token_ids = result.draft_token_ids
            if result.prompt_logprobs:
                seq.prompt_logprobs.extend(result.prompt_logprobs)
            num_new = self._append_tokens(seq, result)
            if num_new or seq.is_finished:
                changed.append((seq, num_new))
        return changed

    def _append_tokens(self, seq: Sequence, result) -> int:
        num_new = 0
        for i, token in enumerate(result.token_ids):
            seq.output_token_ids.append(token)
            if result.logprobs is not None:
                seq.output_logprobs.append(result.logprobs[i])
            num_new += 1
            reason = self._stop_reason(seq, token)
            if reason:
                self._finish(seq, reason)
                break
        return num_new

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in self.config.eos_token_ids and \
                len(seq.output_token_ids) >= params.min_tokens:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free(seq)
        del self._sequences[seq.request_id]
        self._retired_ids.append(seq.request_id)
