"""StepPlan <-> protobuf bytes, the message rank 0 broadcasts to the other ranks each step."""

from nextserve.v1 import engine_pb2, plan_pb2
from worker.engine.plan import NewRequest, ScheduledSequence, StepPlan
from worker.server.convert import sampling_config, sampling_params


def encode(plan: StepPlan, shutdown: bool = False) -> bytes:
    message = plan_pb2.StepPlan(step_id=plan.step_id, finished_request_ids=plan.finished_request_ids, shutdown=shutdown)
    for r in plan.new_requests:
        message.new_requests.append(engine_pb2.AddRequest(
            request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, sampling=sampling_config(r.params)))
    for s in plan.sequences:
        entry = message.sequences.add(
            request_id=s.request_id, token_ids=s.token_ids, start_position=s.start_position,
            block_table=s.block_table, state_group=s.state_group, num_accepted_slot=s.num_accepted_slot,
            is_decode=s.is_decode, sample=s.sample)
        if s.next_token_id is not None:
            entry.next_token_id = s.next_token_id
    return message.SerializeToString()


def decode(data: bytes) -> tuple[StepPlan, bool]:
    """-> (plan, shutdown)."""
    message = plan_pb2.StepPlan.FromString(data)
    sequences = [
        ScheduledSequence(
            request_id=s.request_id, token_ids=list(s.token_ids), start_position=s.start_position,
            block_table=list(s.block_table), state_group=s.state_group, num_accepted_slot=s.num_accepted_slot,
            is_decode=s.is_decode, sample=s.sample,
            next_token_id=s.next_token_id if s.HasField("next_token_id") else None)
        for s in message.sequences
    ]
    new_requests = [NewRequest(r.request_id, list(r.prompt_token_ids), sampling_params(r.sampling))
                    for r in message.new_requests]
    return StepPlan(message.step_id, sequences, new_requests, list(message.finished_request_ids)), message.shutdown
