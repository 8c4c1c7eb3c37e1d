"""StepPlan <-> protobuf bytes, the message rank 0 broadcasts to the other ranks each step.

Deltas only: a request's prompt and sampling settings travel once (new_requests), and a sequence's
KV block table travels as the blocks appended since it was last scheduled. Blocks are only ever
appended while a sequence runs; a sequence starting at position 0 (new, or recomputed after
preemption) resends its table from scratch.
"""

from nextserve.v1 import engine_pb2, plan_pb2
from worker.engine.plan import NewRequest, ScheduledSequence, StepPlan
from worker.server.convert import sampling_config, sampling_params


class PlanEncoder:
    """Rank 0's side: remembers how much of each request's block table the ranks already have."""

    def __init__(self):
        self._sent_blocks: dict[str, int] = {}

    def encode(self, plan: StepPlan, shutdown: bool = False) -> bytes:
        message = plan_pb2.StepPlan(step_id=plan.step_id, finished_request_ids=plan.finished_request_ids,
                                    shutdown=shutdown)
        for r in plan.new_requests:
            message.new_requests.append(engine_pb2.AddRequest(
                request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, sampling=sampling_config(r.params)))
        for s in plan.sequences:
            reset = s.start_position == 0 or s.request_id not in self._sent_blocks
            sent = 0 if reset else self._sent_blocks[s.request_id]
            entry = message.sequences.add(
                request_id=s.request_id, token_ids=s.token_ids, start_position=s.start_position,
                appended_blocks=s.block_table[sent:], reset_blocks=reset, state_group=s.state_group,
                num_accepted_slot=s.num_accepted_slot, is_decode=s.is_decode, sample=s.sample)
            if s.next_token_id is not None:
                entry.next_token_id = s.next_token_id
            self._sent_blocks[s.request_id] = len(s.block_table)
        for request_id in plan.finished_request_ids:
            self._sent_blocks.pop(request_id, None)
        return message.SerializeToString()


class PlanDecoder:
    """Every rank's side: rebuilds the block tables from the deltas."""

    def __init__(self):
        self._tables: dict[str, list[int]] = {}

    def decode(self, data: bytes) -> tuple[StepPlan, bool]:
        """-> (plan, shutdown)."""
        message = plan_pb2.StepPlan.FromString(data)
        sequences = [self._sequence(s) for s in message.sequences]
        for request_id in message.finished_request_ids:
            self._tables.pop(request_id, None)
        new_requests = [NewRequest(r.request_id, list(r.prompt_token_ids), sampling_params(r.sampling))
                        for r in message.new_requests]
        plan = StepPlan(message.step_id, sequences, new_requests, list(message.finished_request_ids))
        return plan, message.shutdown

    def _sequence(self, s) -> ScheduledSequence:
        table = [] if s.reset_blocks else self._tables.get(s.request_id)
        if table is None:
            raise RuntimeError(f"step plan continues request {s.request_id!r} whose block table this rank never got")
        table = table + list(s.appended_blocks)
        self._tables[s.request_id] = table
        return ScheduledSequence(
            request_id=s.request_id, token_ids=list(s.token_ids), start_position=s.start_position,
            block_table=table, state_group=s.state_group, num_accepted_slot=s.num_accepted_slot,
            is_decode=s.is_decode, sample=s.sample,
            next_token_id=s.next_token_id if s.HasField("next_token_id") else None)
