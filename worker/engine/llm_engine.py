"""The engine: scheduler + cache manager + runner, one `step()` at a time."""

import logging
import weakref
from dataclasses import dataclass, field

import torch

from worker.config import ModelConfig
from worker.engine.cache_manager import CacheManager
from worker.engine.config import EngineConfig
from worker.engine.model_worker import ModelWorker
from worker.engine.plan import StepOutput, StepPlan
from worker.engine.proposer import Proposer
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import FinishReason, Sequence
from worker.model.shard_check import check_model_shards

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]  # generated in the last step
    logprobs: list | None = None  # per token: (logprob, [(token_id, logprob), ...])
    # With params.prompt_logprobs, on the output that carries the first tokens and on the last: per
    # prompt token, None for the first (nothing predicts it), then (logprob, [(token_id, logprob), ...]).
    prompt_logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0
    mean_accepted_length: float = 0.0
    acceptance_rate_per_position: list[float] = field(default_factory=list)
    num_preemptions: int = 0


def pooled_accepted_length(outputs: list[RequestOutput]) -> float | None:
    """Tokens emitted per verify step over all the requests' verify steps (None: no verify step)."""
    steps = sum(o.num_verify_steps for o in outputs)
    return (sum(o.num_accepted_tokens for o in outputs) + steps) / steps if steps else None


@dataclass
class EngineCounters:
    """Totals since start, for metrics: only ever incremented, read from other threads as they are."""

    num_steps: int = 0
    num_batched_tokens: int = 0  # fed through the model: prefill chunks, decode and verify positions
    num_prompt_tokens: int = 0  # of requests accepted by add_request
    num_generated_tokens: int = 0
    # By finish reason; every key exists from the start, so readers on other threads never see it grow.
    num_finished: dict[str, int] = field(default_factory=lambda: {reason.value: 0 for reason in FinishReason})
    num_verify_steps: int = 0  # decode steps of a sequence with drafts
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at position j

    def count_step(self, plan: StepPlan, result: StepOutput | None, outputs: list[RequestOutput]) -> None:
        self.num_steps += 1
        self.num_batched_tokens += plan.num_tokens
        for out in outputs:
            self.num_generated_tokens += len(out.new_token_ids)
            if out.finished:
                self.num_finished[out.finish_reason] += 1
        if result is None:
            return
        for entry, seq_out in zip(plan.sequences, result.sequences):
            if entry.num_drafts:
                self.num_verify_steps += 1
                self.num_drafted_tokens += entry.num_drafts
                self.num_accepted_tokens += seq_out.num_accepted_drafts
                for j in range(seq_out.num_accepted_drafts):
                    self.accepted_per_position[j] += 1


class LLMEngine:
    """Rank 0: the scheduler and cache bookkeeping over a ModelWorker (and, with tensor parallelism,
    a group of ranks that execute the same plans)."""

    def __init__(self, config: EngineConfig, proposer: Proposer | None = None):
        self.config = config
        self.ranks = None
        self._stop_ranks = None
        agree = None
        if config.tensor_parallel_size > 1:
            from worker.parallel.group import launch_ranks

            model_config = ModelConfig.from_pretrained(config.model)
            model_config.check_tensor_parallel(config.tensor_parallel_size)
            check_model_shards(model_config, config.tensor_parallel_size)
            self.ranks = launch_ranks(config)
            # Stops the ranks once: on shutdown(), when this engine is garbage-collected, or at exit.
            self._stop_ranks = weakref.finalize(self, self.ranks.shutdown)
            agree = self.ranks.agree_on_cache_plan
        self.device = torch.device(config.device if config.tensor_parallel_size == 1 else _rank_device(config, 0))
        try:
            self.worker = ModelWorker(config, self.device, agree, proposer)
        except BaseException:
            self.shutdown()
            raise
        self.model_config, self.model = self.worker.model_config, self.worker.model
        self.max_model_len, self.shapes, self.cache_plan = (
            self.worker.max_model_len, self.worker.shapes, self.worker.cache_plan)
        self.runner = self.worker.runner if self.ranks is None else self.ranks.broadcasting_runner(self.worker.runner)
        self._ahead = None  # (plan, pending step) launched before the previous step's tokens were known
        self.num_steps_ahead = 0
        self.counters = EngineCounters(accepted_per_position=[0] * config.speculative_tokens)
        self.cache = CacheManager(self.cache_plan.num_blocks, config.block_size, self.cache_plan.num_state_groups)
        k = config.speculative_tokens
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=self.max_model_len,
                max_num_seqs=min(config.max_num_seqs, self.cache_plan.num_state_groups),
                max_num_batched_tokens=config.max_num_batched_tokens,
                num_spec_tokens=k,
                eos_token_ids=self.model_config.eos_token_ids,
            ),
            self.cache,
        )
        logger.info(
            "cache: %d KV blocks x %d tokens, %d GDN slot groups x %d slots (%.1f MiB states); "
            "max concurrency %.1f at %d tokens",
            self.cache_plan.num_blocks, config.block_size, self.cache_plan.num_state_groups, 1 + k,
            self.cache_plan.num_state_groups * self.shapes.bytes_per_state_group / 2**20,
            self.cache_plan.max_concurrency(config.block_size, self.max_model_len), self.max_model_len,
        )

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks and free this rank's graphs and caches (idempotent)."""
        if self._stop_ranks is not None:
            self._stop_ranks()
        self.ranks = None
        self._ahead = None
        worker = getattr(self, "worker", None)  # None when the worker failed to start
        if worker is not None:
            worker.release()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        self.scheduler.add(Sequence(request_id, list(prompt_token_ids), params))
        self.counters.num_prompt_tokens += len(prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        """Run one step and apply its results. With async scheduling, the next decode step is launched
        before this one's tokens are waited for (when it can be planned ahead), so the host's work
        overlaps the device's; a sequence that finishes meanwhile has that step's token dropped."""
        aborted = self.scheduler.apply_aborts()
        outputs = [self._output(seq, 0) for seq in aborted]
        if self._ahead is not None:
            (plan, pending), self._ahead = self._ahead, None
        else:
            plan, pending = self.scheduler.schedule(), None
            if plan.sequences or plan.new_requests or plan.finished_request_ids:
                pending = self.runner.launch(plan)
        result = None
        if pending is not None:
            self._launch_ahead(plan, pending)
            result = pending.finish()
            outputs += [self._output(seq, n) for seq, n in self.scheduler.update(plan, result)]
        self.counters.count_step(plan, result, outputs)
        if not self.scheduler.has_unfinished:
            if self._ahead is not None:  # every sequence of it finished meanwhile: nothing to keep
                (ahead, ahead_pending), self._ahead = self._ahead, None
                self.scheduler.update(ahead, ahead_pending.finish())
            # Nothing left to schedule: hand the runner the last retirements now, not with a later step.
            self.runner.execute(self.scheduler.schedule())
        return outputs

    def _launch_ahead(self, plan: StepPlan, pending) -> None:
        if not self.config.async_scheduling or self.ranks is not None or not plan.sequences:
            return
        if pending.decode is None:  # an eager step (e.g. min_tokens' last masked one): no device results to feed on
            return
        rows = [self.runner.requests[s.request_id] for s in plan.sequences]
        if not self.runner.can_run_ahead(plan.sequences, rows):
            return
        ahead = self.scheduler.schedule_ahead(plan)
        if ahead is not None:
            self._ahead = (ahead, self.runner.launch(ahead, previous=pending))
            self.num_steps_ahead += 1

    def _output(self, seq: Sequence, num_new: int) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            new_token_ids=seq.output_token_ids[len(seq.output_token_ids) - num_new :] if num_new else [],
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=self._prompt_logprobs(seq, num_new),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_drafted_tokens=seq.spec.num_drafted_tokens,
            num_accepted_tokens=seq.spec.num_accepted_tokens,
            num_verify_steps=seq.spec.num_verify_steps,
            mean_accepted_length=seq.spec.mean_accepted_length,
            acceptance_rate_per_position=seq.spec.acceptance_rate_per_position,
            num_preemptions=seq.num_preemptions,
        )

    @staticmethod
    def _prompt_logprobs(seq: Sequence, num_new: int) -> list | None:
        """Only where a client needs them (the first tokens, the end), not copied every step."""
        first_tokens = num_new > 0 and num_new == len(seq.output_token_ids)
        if seq.params.prompt_logprobs is None or not (first_tokens or seq.is_finished):
            return None
        return [None, *seq.prompt_logprobs]

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": self.cache.num_free_blocks,
            "num_blocks": self.cache.num_blocks,
            "num_free_state_groups": self.cache.num_free_state_groups,
            "num_state_groups": self.cache.num_state_groups,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _rank_device(config: EngineConfig, rank: int) -> str:
    return f"cuda:{rank}" if config.device.startswith("cuda") else "cpu"
