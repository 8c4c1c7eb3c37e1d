"""Tensor-parallel group state: which rank this process is and how to reduce across ranks.

With one rank (the default) every collective is the identity, so the model runs unchanged. The
all-reduce is chosen when the group forms (worker/parallel/all_reduce.py).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from worker.parallel.all_reduce import AllReduce, GroupAllReduce


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    reducer: AllReduce | None = None  # None: the identity at size 1, else the default group's all-reduce

    def __post_init__(self):
        if self.reducer is None:
            object.__setattr__(self, "reducer", AllReduce() if self.size == 1 else GroupAllReduce(None))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """-> x summed over the ranks (x itself, reduced in place)."""
        return self.reducer.all_reduce(x)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float, quant_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed, new residual): x summed over the ranks, added to the residual stream, then the
        zero-centred RMSNorm (AllReduce.all_reduce_add_rms_norm)."""
        return self.reducer.all_reduce_add_rms_norm(x, residual, weight, eps, quant_block)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def shard(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"tensor parallel size {self.size} does not divide {what} ({total})")
        return total // self.size


_TP = TensorParallel()


def get_tp() -> TensorParallel:
    return _TP


def set_tp(rank: int, size: int, reducer: AllReduce | None = None) -> None:
    global _TP
    _TP = TensorParallel(rank, size, reducer)


@contextlib.contextmanager
def tensor_parallel_as(rank: int, size: int):
    """Build layers as rank `rank` of `size` would (e.g. on the meta device, to check a split), then restore."""
    global _TP
    saved, _TP = _TP, TensorParallel(rank, size)
    try:
        yield
    finally:
        _TP = saved
