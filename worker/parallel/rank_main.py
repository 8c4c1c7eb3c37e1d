"""Ranks 1..N-1 of a tensor-parallel group: load the shard, then run every plan rank 0 sends."""

import logging

import torch

from worker.engine.config import EngineConfig
from worker.parallel import plan_codec
from worker.parallel.group import (PlanChannel, destroy_process_group, agree_on_cache_plan, die_with_parent,
                                   join_group, rank_device)

logger = logging.getLogger(__name__)


def run_rank(config: EngineConfig, rank: int, port: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
    channel = PlanChannel(join_group(config, rank, port))

    from worker.engine.model_worker import ModelWorker

    worker = ModelWorker(config, rank_device(config, rank), lambda plan: agree_on_cache_plan(plan, channel.group))
    decoder = plan_codec.PlanDecoder()
    while True:
        plan, shutdown = decoder.decode(channel.receive())
        if shutdown:
            break
        worker.runner.execute(plan)
    logger.info("rank %d stopping", rank)
    destroy_process_group(10.0)
