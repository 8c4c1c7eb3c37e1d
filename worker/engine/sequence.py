"""A request's life inside the engine: its tokens, its cache holdings and its progress."""

import enum
from dataclasses import dataclass, field

from worker.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos or a stop token
    LENGTH = "length"  # max_tokens or the model's maximum length
    ABORT = "abort"


@dataclass
class SpeculativeStats:
    num_verify_steps: int = 0
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at position j

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        self.num_verify_steps += 1
        self.num_drafted_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the bonus / correction token)."""
        if not self.num_verify_steps:
            return 0.0
        return (self.num_accepted_tokens + self.num_verify_steps) / self.num_verify_steps

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        if not self.num_verify_steps:
            return []
        return [n / self.num_verify_steps for n in self.accepted_per_position]


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)  # prompt tokens 1.. scored so far (params.prompt_logprobs)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose KV and GDN state are in the cache
    block_table: list[int] = field(default_factory=list)
    state_group: int | None = None
    num_accepted_slot: int = 1  # the current GDN state is slot num_accepted_slot-1 of the group
    draft_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    spec: SpeculativeStats = field(default_factory=SpeculativeStats)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens at positions start..end-1 without building the whole list (a hot path for long prompts)."""
        n_prompt = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:min(end, n_prompt)]
        tail = self.output_token_ids[max(start - n_prompt, 0):max(end - n_prompt, 0)]
        return head + tail

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until the whole known context is in the cache; then each step feeds the last token."""
        return self.num_computed_tokens == 0 or self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_at(self, position: int) -> int:
        n_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n_prompt else self.output_token_ids[position - n_prompt]

    def reset_for_recompute(self) -> None:
        """After preemption: everything is recomputed from the tokens, drafts are dropped."""
        self.num_computed_tokens = 0
        self.num_accepted_slot = 1
        self.draft_token_ids = []
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
