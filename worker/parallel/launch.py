"""Starting the ranks of a tensor-parallel group from rank 0, and watching them until they are up.

Each rank is a fresh interpreter running `python -m worker.parallel.rank_main`, so it never imports
the user's `__main__` (multiprocessing's spawn does, and a script without a main guard then re-runs
itself in every rank). Its environment is ours with NVLink multicast turned off (NO_MULTICAST_ENV
in worker/parallel/all_reduce.py). A rank's output goes through a pipe to rank 0's stderr, and
rank 0 keeps the last lines of each, so an error can show why a rank died.

Start-up has two waits, both on keys the ranks set in rank 0's TCPStore: every rank connected
("joined", then the process group forms at once), and every rank loaded its shard and sized its
caches ("loaded", then the first collective runs at once). Rank 0 polls those keys and its ranks'
exit codes together, so a rank that dies makes it raise within a fraction of a second, naming the
rank, its exit code and its last log lines; a rank that hangs makes it raise at the wait's timeout.
"""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import torch.distributed as dist

from worker.engine.config import EngineConfig
from worker.parallel.all_reduce import forbid_multicast

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 300.0  # a fresh interpreter imports torch and connects: seconds, minutes on a cold disk
LOAD_TIMEOUT_S = 1800.0  # ranks load their shards (an 80B checkpoint from a network disk) and size caches
TAIL_LINES = 20
POLL_S = 0.05


class RankStartupError(RuntimeError):
    """A tensor-parallel rank exited or hung during start-up."""

    def __init__(self, message: str, rank: int, exit_code: int | None, tail: list[str]):
        lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        super().__init__(f"{message}; its last log lines:\n{lines}")
        self.rank, self.exit_code, self.tail = rank, exit_code, tail


def store_key(stage: str, rank: int) -> str:
    return f"nextserve/{stage}/{rank}"


class RankProcess:
    """One rank's interpreter; its output is forwarded to our stderr and the last lines are kept."""

    def __init__(self, config: EngineConfig, rank: int, store_port: int):
        argv = [sys.executable, "-m", "worker.parallel.rank_main", "--rank", str(rank), "--store-port",
                str(store_port), "--parent-pid", str(os.getpid()), "--config", json.dumps(asdict(config))]
        self.rank = rank
        env = dict(os.environ)
        forbid_multicast(env)
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
        self.pid = self.popen.pid
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader = threading.Thread(target=self._forward, name=f"tp-rank-{rank}-output", daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        for line in self.popen.stdout:
            if line.strip():
                self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):  # our stderr is gone (interpreter exit); keep the tail
                pass

    @property
    def exit_code(self) -> int | None:
        return self.popen.poll()

    def tail(self) -> list[str]:
        """The last lines it printed (all of them once it has exited and the pipe is drained)."""
        if self.exit_code is not None:
            self._reader.join(2.0)
        return list(self._tail)

    def describe_exit(self) -> str:
        code = self.exit_code
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        return f"exited with code {code}"

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for it to exit by itself, then kill it."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(2.0)

    def kill(self) -> None:
        self.popen.kill()
        self.stop(0)


def spawn_ranks(config: EngineConfig, store_port: int) -> list[RankProcess]:
    return [RankProcess(config, rank, store_port) for rank in range(1, config.tensor_parallel_size)]


def wait_for_ranks(store: dist.TCPStore, processes: list[RankProcess], stage: str, timeout: float) -> None:
    """Until every rank has set its `stage` key; raise RankStartupError as soon as one exits, or at the timeout."""
    pending = {p.rank: p for p in processes}
    deadline = time.monotonic() + timeout
    while pending:
        for rank, process in list(pending.items()):
            if store.check([store_key(stage, rank)]):
                del pending[rank]
            elif process.exit_code is not None:
                raise RankStartupError(f"tensor-parallel rank {rank} {process.describe_exit()} during start-up "
                                       f"(before it {stage})", rank, process.exit_code, process.tail())
        if pending and time.monotonic() > deadline:
            rank, process = next(iter(pending.items()))
            raise RankStartupError(f"tensor-parallel rank {rank} has not {stage} after {timeout:.0f} s "
                                   f"(ranks not {stage}: {sorted(pending)})", rank, None, process.tail())
        time.sleep(POLL_S)
