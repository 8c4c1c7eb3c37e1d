"""What rank 0 decides each step (StepPlan) and what the runner returns (StepOutput).

Plain data, so the plan can later travel to other tensor-parallel ranks as protobuf. The runner
keeps per-request sampling state keyed by request id: a plan introduces a request once
(`new_requests`) and retires it once (`finished_request_ids`).
"""

from dataclasses import dataclass, field

from worker.engine.sampling_params import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ScheduledSequence:
    request_id: str
    token_ids: list[int]  # fed this step: a prefill chunk, or [last token, d1..dk] for a decode
    start_position: int
    block_table: list[int]
    state_group: int
    num_accepted_slot: int  # GDN state to start from: slot num_accepted_slot-1
    is_decode: bool
    sample: bool  # False for a prefill chunk that does not reach the end of the known tokens
    next_token_id: int | None = None  # for such a chunk: the token after it (the MTP reads it)

    @property
    def num_drafts(self) -> int:
        return len(self.token_ids) - 1 if self.is_decode else 0


@dataclass
class StepPlan:
    step_id: int
    sequences: list[ScheduledSequence]  # decodes first, then prefill chunks
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass
class SequenceOutput:
    token_ids: list[int]  # emitted: accepted drafts then the correction / bonus token; [] if not sampled
    num_accepted_drafts: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # proposals for the next step
    logprobs: list | None = None  # per emitted token: (logprob, [(token_id, logprob), ...top-n])
    # Prompt tokens this step scored (a prefill chunk of a request with prompt_logprobs), in order:
    # (logprob, [(token_id, logprob), ...top-n]) each.
    prompt_logprobs: list | None = None


@dataclass
class StepOutput:
    sequences: list[SequenceOutput]  # aligned with StepPlan.sequences
