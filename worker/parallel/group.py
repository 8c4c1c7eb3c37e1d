"""Joining, watching and stopping the ranks of a tensor-parallel worker group.

Rank 0 (the caller) starts ranks 1..N-1 (worker/parallel/launch.py) and hosts the TCPStore they
rendezvous on. Model collectives run on the default process group (NCCL on GPUs, gloo on the CPU;
small all-reduces on GPUs over peer memory, worker/parallel/all_reduce.py); step plans travel over
a separate gloo group. Until every rank has loaded its shard, a rank that dies makes rank 0 raise
RankStartupError; after that, a rank that dies takes the group down: children die with their
parent (PR_SET_PDEATHSIG), and rank 0 exits as soon as it sees a child gone, so the router reports
UNAVAILABLE instead of waiting on a collective that never ends.

Sampling: every rank samples from the same all-gathered logits with the same per-request generators
(seeded identically), so no token broadcast is needed. A broadcast would add a collective and a
device-to-host wait to every step, and each rank needs the sampled tokens on its own device anyway to
build the MTP head's inputs. Rank 0 runs the plan decoded from the bytes it broadcasts, so float
settings (temperature, top_p) are bit-identical across ranks.
"""

import ctypes
import gc
import logging
import os
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.distributed import set_tp
from worker.engine.config import EngineConfig
from worker.engine.memory import CachePlan
from worker.parallel import plan_codec
from worker.parallel.all_reduce import choose_all_reduce, forbid_multicast
from worker.parallel.launch import JOIN_TIMEOUT_S, LOAD_TIMEOUT_S, RankProcess, spawn_ranks, wait_for_ranks

logger = logging.getLogger(__name__)
# Collectives once the group is up. Start-up waits are bounded separately (launch.py), with the
# ranks watched, because NCCL does not notice a dead peer by itself.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
STOP_TIMEOUT_S = 10.0


def connect_store(rank: int, port: int) -> dist.TCPStore:
    """Rank 0 hosts the rendezvous store (port 0: any free port, read back from `.port`); the others
    connect to it, retrying until JOIN_TIMEOUT_S."""
    return dist.TCPStore("127.0.0.1", port, is_master=rank == 0, timeout=timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}" if config.device.startswith("cuda") else "cpu")


def join_group(config: EngineConfig, rank: int, store: dist.Store):
    """Join the default group and the plan group, and choose the model's all-reduce; -> the plan group (gloo)."""
    size = config.tensor_parallel_size
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    forbid_multicast()
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    plan_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    reducer = choose_all_reduce(dist.group.WORLD, rank_device(config, rank), plan_group,
                                config.disable_custom_all_reduce)
    set_tp(rank, size, reducer)
    return plan_group


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def agree_on_cache_plan(plan: CachePlan, group) -> CachePlan:
    """Every rank takes the smallest KV block and slot-group counts of the group."""
    sizes = torch.tensor([plan.num_blocks, plan.num_state_groups], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN, group=group)
    return CachePlan(int(sizes[0]), int(sizes[1]))


class PlanChannel:
    """Length-prefixed bytes broadcast from rank 0 over the plan group."""

    def __init__(self, group):
        self.group = group

    def send(self, data: bytes) -> None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src=0, group=self.group)
        if payload.numel():
            dist.broadcast(payload, src=0, group=self.group)

    def receive(self) -> bytes:
        length = torch.empty(1, dtype=torch.int64)
        dist.broadcast(length, src=0, group=self.group)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        if payload.numel():
            dist.broadcast(payload, src=0, group=self.group)
        return payload.numpy().tobytes()


class BroadcastingRunner:
    """Rank 0's runner: sends each plan to the other ranks, then runs what they run (the decoded plan,
    so float settings are bit-identical on every rank)."""

    def __init__(self, runner, channel: PlanChannel):
        self.runner = runner
        self.channel = channel
        self.encoder = plan_codec.PlanEncoder()
        self.decoder = plan_codec.PlanDecoder()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, plan):
        return self.launch(plan).finish()

    def launch(self, plan):
        data = self.encoder.encode(plan)
        self.channel.send(data)
        return self.runner.launch(self.decoder.decode(data)[0])


class RankGroup:
    def __init__(self, config: EngineConfig, processes: list[RankProcess], store: dist.TCPStore,
                 channel: PlanChannel):
        self.config = config
        self.processes = processes
        self.store = store
        self.channel = channel
        self._started = False
        self._stopping = False

    def agree_on_cache_plan(self, plan: CachePlan) -> CachePlan:
        """The last step of start-up (every rank calls it once its shard is loaded); from here on a
        dying rank takes the process down."""
        wait_for_ranks(self.store, self.processes, "loaded", LOAD_TIMEOUT_S)
        plan = agree_on_cache_plan(plan, self.channel.group)
        self._started = True
        threading.Thread(target=self._watch, name="rank-monitor", daemon=True).start()
        return plan

    def broadcasting_runner(self, runner) -> BroadcastingRunner:
        return BroadcastingRunner(runner, self.channel)

    def _watch(self) -> None:
        while not self._stopping:
            for process in self.processes:
                if process.exit_code is not None and not self._stopping:
                    logger.error("tensor-parallel rank %d %s; taking the worker group down", process.rank,
                                 process.describe_exit())
                    os._exit(1)
            time.sleep(0.2)

    def shutdown(self) -> None:
        """Tell the ranks to stop and wait for them (bounded); before start-up ended, just kill them."""
        self._stopping = True
        if self._started:
            try:
                self.channel.send(plan_codec.PlanEncoder().encode(_empty_plan(), shutdown=True))
            except Exception:  # a rank may already be gone; the waits below bound the stop
                logger.warning("could not tell every rank to stop")
        deadline = time.monotonic() + (STOP_TIMEOUT_S if self._started else 0.0)
        for process in self.processes:
            process.stop(max(0.0, deadline - time.monotonic()))
        destroy_process_group(STOP_TIMEOUT_S)
        set_tp(0, 1)


def destroy_process_group(timeout: float) -> None:
    """destroy_process_group can hang with NCCL (seen after CUDA-graph capture): give it a bounded wait."""
    if not dist.is_initialized():
        return
    done = threading.Thread(target=dist.destroy_process_group, daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        logger.warning("destroy_process_group did not return in %.0f s; leaving it behind", timeout)


def _empty_plan():
    from worker.engine.plan import StepPlan

    return StepPlan(0, [])


def launch_ranks(config: EngineConfig) -> RankGroup:
    """Called on rank 0: start ranks 1..N-1 and form the group with them (RankStartupError if one
    exits or hangs)."""
    if dist.is_initialized():
        gc.collect()  # a dropped LLM whose ranks are still up is shut down by its finalizer
    if dist.is_initialized():
        raise RuntimeError("a process group is already running in this process (an LLM that was not shut down?); "
                           "call shutdown() on it before starting another tensor-parallel LLM")
    store = connect_store(0, 0)
    processes = spawn_ranks(config, store.port)
    try:
        wait_for_ranks(store, processes, "joined", JOIN_TIMEOUT_S)
        group = join_group(config, 0, store)
    except BaseException:
        for process in processes:
            process.kill()
        destroy_process_group(STOP_TIMEOUT_S)
        set_tp(0, 1)
        raise
    logger.info("tensor-parallel group of %d ranks joined (%s)", config.tensor_parallel_size,
                "nccl" if config.device.startswith("cuda") else "gloo")
    return RankGroup(config, processes, store, PlanChannel(group))
