"""Ranks 1..N-1 of a tensor-parallel group: load the shard, then run every plan rank 0 sends.

    python -m worker.parallel.rank_main --rank R --store-port P --parent-pid PID --config JSON

Rank 0 starts this in a fresh interpreter (worker/parallel/launch.py); nothing of the user's
program is imported here. Progress is reported through keys in rank 0's store ("joined",
"loaded"), which rank 0 waits on while it watches this process.

NEXTSERVE_TEST_RANK_FAULT=RANK:STAGE:ACTION (tests only) makes rank RANK fail at STAGE ("join":
before the rendezvous, "load": before the first collective) by ACTION ("kill": SIGKILL itself,
"exit": log a line and exit with code 3).
"""

import argparse
import json
import logging
import os
import signal
import sys

import torch

from worker.engine.config import EngineConfig
from worker.parallel import plan_codec
from worker.parallel.group import (PlanChannel, agree_on_cache_plan, connect_store, destroy_process_group,
                                   die_with_parent, join_group, rank_device)
from worker.parallel.launch import store_key

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker.parallel.rank_main", description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True, help="rank 0's TCPStore on 127.0.0.1")
    parser.add_argument("--parent-pid", type=int, required=True, help="rank 0's pid: this rank dies with it")
    parser.add_argument("--config", type=json.loads, required=True, help="the EngineConfig as JSON")
    return parser.parse_args(argv)


def fault_hook(rank: int, spec: str | None):
    """-> fail(stage): carries out NEXTSERVE_TEST_RANK_FAULT if it names this rank (a no-op otherwise)."""
    parts = spec.split(":") if spec else []
    if len(parts) != 3 or parts[0] != str(rank):
        return lambda stage: None
    _, fault_stage, action = parts

    def fail(stage: str) -> None:
        if stage != fault_stage:
            return
        logger.error("test fault: rank %d fails at %s (%s)", rank, stage, action)
        logging.shutdown()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(3)

    return fail


def run_rank(config: EngineConfig, rank: int, store_port: int, fail) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
    store = connect_store(rank, store_port)
    fail("join")
    store.set(store_key("joined", rank), "1")
    channel = PlanChannel(join_group(config, rank, store))

    from worker.engine.model_worker import ModelWorker

    def agree(plan):
        fail("load")
        store.set(store_key("loaded", rank), "1")
        return agree_on_cache_plan(plan, channel.group)

    worker = ModelWorker(config, rank_device(config, rank), agree)
    decoder = plan_codec.PlanDecoder()
    while True:
        plan, shutdown = decoder.decode(channel.receive())
        if shutdown:
            break
        worker.runner.execute(plan)
    logger.info("rank %d stopping", rank)
    destroy_process_group(10.0)


def main(argv=None) -> None:
    args = parse_args(argv)
    die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s")
    run_rank(EngineConfig(**args.config), args.rank, args.store_port,
             fault_hook(args.rank, os.environ.get("NEXTSERVE_TEST_RANK_FAULT")))
    # Out without the interpreter's teardown: gloo's threads can still be joinable when C++ statics are
    # destroyed, which aborts a rank that finished its work ("terminate called without an active
    # exception", exit -6; seen in the test ranks, tests/rank_process.py).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
