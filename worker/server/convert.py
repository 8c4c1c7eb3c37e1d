"""Protobuf <-> engine objects for the Engine service (the engine itself never sees protobuf)."""

from nextserve.v1 import common_pb2, engine_pb2
from worker.engine.llm_engine import RequestOutput
from worker.engine.sampling_params import SamplingParams

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def sampling_params(config: engine_pb2.SamplingConfig) -> SamplingParams:
    """Raises ValueError naming the field when a value cannot work."""
    return SamplingParams(
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
        presence_penalty=config.presence_penalty,
        frequency_penalty=config.frequency_penalty,
        seed=config.seed if config.HasField("seed") else None,
        ignore_eos=config.ignore_eos,
        stop_token_ids=list(config.stop_token_ids),
        logprobs=config.logprobs if config.HasField("logprobs") else None,
        min_tokens=config.min_tokens,
        prompt_logprobs=config.prompt_logprobs if config.HasField("prompt_logprobs") else None,
    )


def sampling_config(params: SamplingParams) -> engine_pb2.SamplingConfig:
    config = engine_pb2.SamplingConfig(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, max_tokens=params.max_tokens, min_tokens=params.min_tokens,
        stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos)
    if params.seed is not None:
        config.seed = params.seed
    if params.logprobs is not None:
        config.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        config.prompt_logprobs = params.prompt_logprobs
    return config


def token_logprob(token_id: int, logprob: float, top: list[tuple[int, float]]) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=token_id, logprob=logprob,
                                   top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in top])


def request_delta(request_id: str, out: RequestOutput) -> engine_pb2.RequestDelta:
    delta = engine_pb2.RequestDelta(
        request_id=request_id,
        token_ids=out.new_token_ids,
        finish_reason=FINISH_REASONS[out.finish_reason],
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.token_ids),
    )
    if out.logprobs is not None and out.new_token_ids:
        for token, (logprob, top) in zip(out.new_token_ids, out.logprobs[-len(out.new_token_ids):]):
            delta.logprobs.append(token_logprob(token, logprob, top))
    is_first = len(out.token_ids) == len(out.new_token_ids)  # also an abort before any token
    if out.prompt_logprobs is not None and is_first:
        for token, (logprob, top) in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            delta.prompt_logprobs.append(token_logprob(token, logprob, top))
    if out.finish_reason == "stop" and out.token_ids:
        delta.matched_stop_token_id = out.token_ids[-1]
    if out.finished:
        delta.speculative.CopyFrom(common_pb2.SpeculativeStats(
            drafted_tokens=out.num_drafted_tokens,
            accepted_tokens=out.num_accepted_tokens,
            mean_accepted_length=out.mean_accepted_length,
            acceptance_rate_per_position=out.acceptance_rate_per_position,
        ))
    return delta


def engine_load(stats: dict) -> common_pb2.EngineLoad:
    return common_pb2.EngineLoad(
        running_requests=stats["num_running"],
        waiting_requests=stats["num_waiting"],
        free_kv_blocks=stats["num_free_blocks"],
        total_kv_blocks=stats["num_blocks"],
        free_gdn_slot_groups=stats["num_free_state_groups"],
        total_gdn_slot_groups=stats["num_state_groups"],
        num_preemptions=stats["num_preemptions"],
    )
