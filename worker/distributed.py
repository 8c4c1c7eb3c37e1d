"""Tensor-parallel group state: which rank this process is and how to reduce across ranks.

With one rank (the default) every collective is the identity, so the model runs unchanged.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

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


def set_tp(rank: int, size: int) -> None:
    global _TP
    _TP = TensorParallel(rank, size)


@contextlib.contextmanager
def tensor_parallel_as(rank: int, size: int):
    """Build layers as rank `rank` of `size` would (e.g. on the meta device, to check a split), then restore."""
    global _TP
    saved, _TP = _TP, TensorParallel(rank, size)
    try:
        yield
    finally:
        _TP = saved
