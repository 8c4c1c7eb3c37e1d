"""Prompt logprobs: the log probability of every prompt token after the first, computed during prefill.

Row p of a prefill chunk (position p) predicts the token at p + 1, so a chunk covering positions
[s, s + n) scores prompt tokens s + 1 .. s + n, the last of which is the first token of the next
chunk; the prompt itself is known from the request, so no plan field is needed. Rows are turned
into logits a few hundred at a time (never a prompt's whole [T, V] logits at once), each chunk
reduced to the target's logprob and the top n before the next. With tensor parallelism
`compute_logits` gathers the vocabulary from every rank, and every rank runs the same plans with
the same bookkeeping, so the collectives line up.

After a preemption the prompt is prefilled again; positions already scored are skipped, so each
prompt token is scored exactly once whatever the chunking. `compute` leaves its results on the
device; `attach` copies them to the host (pinned memory, one event wait) after the step's own token copy,
so a step that scores a prompt waits for the device no earlier than any other step (and steps that
score none do nothing).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from worker.engine.host_io import PendingHostCopy, index_tensor
from worker.engine.plan import NewRequest, StepOutput, StepPlan

ROWS_PER_CHUNK = 256  # rows of [V] fp32 logits held at once (and their log-softmax)


@dataclass
class _Request:
    prompt_token_ids: list[int]
    num_top: int
    num_scored: int = 0  # positions 0..num_scored-1 have scored their next prompt token


@dataclass
class _Rows:
    """The rows of one step to score: their index in the step's hidden states and their targets."""

    hidden_rows: list[int]
    target_ids: list[int]
    spans: list[tuple[int, int, int]]  # (sequence index in the plan, first row, number of rows)


@dataclass
class Scored:
    """One step's scores, still on the device: per row the target's logprob and the top n."""

    rows: _Rows
    num_tops: dict[int, int]  # sequence index -> its request's n
    chosen: torch.Tensor  # [R]
    top_values: torch.Tensor | None  # [R, n], n the largest asked this step
    top_ids: torch.Tensor | None

    def to_host(self) -> dict[int, list]:
        """{sequence index: [(logprob, [(token_id, logprob), ...top n])]} in prompt order."""
        host = PendingHostCopy(dict(chosen=self.chosen, top_values=self.top_values, top_ids=self.top_ids)).result()
        chosen, top_values, top_ids = host["chosen"], host["top_values"], host["top_ids"]
        results = {}
        for index, first, count in self.rows.spans:
            num_top = self.num_tops[index]
            results[index] = [
                (chosen[row], list(zip(top_ids[row][:num_top], top_values[row][:num_top])) if num_top else [])
                for row in range(first, first + count)]
        return results


class PromptLogprobs:
    """Per-request bookkeeping and the chunked computation; one per runner (so one per rank)."""

    def __init__(self, rows_per_chunk: int = ROWS_PER_CHUNK):
        self.rows_per_chunk = rows_per_chunk
        self._requests: dict[str, _Request] = {}

    def track(self, plan: StepPlan) -> None:
        """Register the plan's new requests that asked for prompt logprobs, drop the finished ones."""
        for request in plan.new_requests:
            self._add(request)
        for request_id in plan.finished_request_ids:  # after the new ones, as the runner does
            self._requests.pop(request_id, None)

    def _add(self, request: NewRequest) -> None:
        num_top = request.params.prompt_logprobs
        if num_top is not None:
            self._requests[request.request_id] = _Request(list(request.prompt_token_ids), num_top)

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def compute(self, plan: StepPlan, hidden_states: torch.Tensor,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> Scored | None:
        """hidden_states [T, H] of the step -> the scores of the prompt tokens it predicts (None: none)."""
        if not self._requests:
            return None
        rows = self._rows(plan)
        if not rows.hidden_rows:
            return None
        num_tops = {i: self._requests[plan.sequences[i].request_id].num_top for i, _, _ in rows.spans}
        num_top = max(num_tops.values())
        device = hidden_states.device
        hidden_rows = index_tensor(rows.hidden_rows, device)
        targets = index_tensor(rows.target_ids, device)
        chosen, top_values, top_ids = [], [], []
        for start in range(0, len(rows.hidden_rows), self.rows_per_chunk):
            end = start + self.rows_per_chunk
            logprobs = torch.log_softmax(compute_logits(hidden_states[hidden_rows[start:end]]).float(), dim=-1)
            chosen.append(logprobs.gather(1, targets[start:end, None]).squeeze(1))
            if num_top:
                values, ids = logprobs.topk(num_top, dim=-1)
                top_values.append(values)
                top_ids.append(ids)
        return Scored(rows, num_tops, torch.cat(chosen), torch.cat(top_values) if top_values else None,
                      torch.cat(top_ids) if top_ids else None)

    def _rows(self, plan: StepPlan) -> _Rows:
        rows = _Rows([], [], [])
        first_row_of_sequence = 0
        for index, entry in enumerate(plan.sequences):
            request = self._requests.get(entry.request_id)
            if request is not None and not entry.is_decode:
                # Positions whose next token is a prompt token not scored yet.
                first = max(entry.start_position, request.num_scored)
                end = min(entry.start_position + len(entry.token_ids), len(request.prompt_token_ids) - 1)
                if end > first:
                    rows.spans.append((index, len(rows.hidden_rows), end - first))
                    offset = first_row_of_sequence - entry.start_position
                    rows.hidden_rows.extend(offset + p for p in range(first, end))
                    rows.target_ids.extend(request.prompt_token_ids[first + 1:end + 1])
                    request.num_scored = end
            first_row_of_sequence += len(entry.token_ids)
        return rows

    @staticmethod
    def attach(output: StepOutput, scored: Scored | None) -> None:
        """Put each sequence's scored prompt tokens on its SequenceOutput."""
        if scored is None:
            return
        for index, entries in scored.to_host().items():
            output.sequences[index].prompt_logprobs = entries
