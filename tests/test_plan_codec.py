"""Step plans survive the trip to the other ranks, as deltas, through preemption and retirement."""

import random

from worker.engine.cache_manager import CacheManager
from worker.engine.plan import SequenceOutput, StepOutput
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Sequence
from worker.parallel.plan_codec import PlanDecoder, PlanEncoder
from nextserve.v1 import plan_pb2


def fake_output(plan, rng, k):
    """One emitted token per sampled sequence (plus a random number of accepted drafts), new drafts."""
    outputs = []
    for s in plan.sequences:
        accepted = rng.randint(0, k) if s.is_decode else 0
        tokens = [rng.randrange(100) for _ in range(accepted + 1)] if s.sample else []
        outputs.append(SequenceOutput(tokens, accepted, [rng.randrange(100) for _ in range(k)] if s.sample else []))
    return StepOutput(outputs)


def test_plans_round_trip_through_preemption_with_block_deltas():
    # temperature 0.75 is exact in float32 (the wire type), so decoded params compare equal
    rng, k = random.Random(0), 2
    cache = CacheManager(num_blocks=24, block_size=4, num_state_groups=6)
    scheduler = Scheduler(SchedulerConfig(max_model_len=200, max_num_seqs=6, max_num_batched_tokens=24,
                                          num_spec_tokens=k), cache)
    for i in range(10):
        scheduler.add(Sequence(f"r{i}", [rng.randrange(100) for _ in range(rng.randint(1, 30))],
                               SamplingParams(max_tokens=rng.randint(5, 40), temperature=0.75, seed=i)))
    encoder, decoder = PlanEncoder(), PlanDecoder()
    decode_sizes = []
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        data = encoder.encode(plan)
        decoded, shutdown = decoder.decode(data)
        assert not shutdown
        assert decoded.sequences == plan.sequences
        assert decoded.finished_request_ids == plan.finished_request_ids
        assert [(r.request_id, r.prompt_token_ids, r.params) for r in decoded.new_requests] == \
               [(r.request_id, r.prompt_token_ids, r.params) for r in plan.new_requests]
        message = plan_pb2.StepPlan.FromString(data)
        for entry, s in zip(message.sequences, plan.sequences):
            if s.is_decode and not entry.reset_blocks:
                decode_sizes.append(len(entry.appended_blocks))
        scheduler.update(plan, fake_output(plan, rng, k))
    assert scheduler.num_preemptions > 0
    assert decode_sizes and max(decode_sizes) <= 2  # a decode step appends at most a block or two, never the table
    assert cache.num_free_blocks == cache.num_blocks


def test_continuing_an_unknown_table_is_an_error():
    from worker.engine.plan import ScheduledSequence, StepPlan

    plan = StepPlan(1, [ScheduledSequence("r", [1], 5, [0, 1], 0, 1, True, True)])
    encoder = PlanEncoder()
    encoder.encode(StepPlan(0, [ScheduledSequence("r", [1, 2, 3, 4, 5], 0, [0, 1], 0, 1, False, True)]))
    data = encoder.encode(plan)
    try:
        PlanDecoder().decode(data)
    except RuntimeError as e:
        assert "never got" in str(e)
    else:
        raise AssertionError("a rank that missed a table must not run with a wrong one")
