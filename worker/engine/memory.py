"""Split one memory budget between KV blocks (per token) and GDN slot groups (per running sequence)."""

import gc
import logging
from dataclasses import dataclass

import torch

from worker.engine.cache_tensors import CacheShapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    num_state_groups: int

    def max_concurrency(self, block_size: int, max_model_len: int) -> float:
        return min(self.num_state_groups, self.num_blocks * block_size / max_model_len)


def plan_cache(budget_bytes: int, shapes: CacheShapes, max_num_seqs: int, num_kv_blocks: int | None) -> CachePlan:
    """Slot groups for max_num_seqs sequences (at most half the budget), the rest in KV blocks."""
    group_bytes = max(shapes.bytes_per_state_group, 1)
    num_groups = max(1, min(max_num_seqs, (budget_bytes // 2) // group_bytes))
    if num_kv_blocks is None:
        num_kv_blocks = (budget_bytes - num_groups * shapes.bytes_per_state_group) // max(shapes.bytes_per_block, 1)
    if num_kv_blocks < 1:
        raise ValueError(f"cache budget of {budget_bytes / 2**20:.1f} MiB leaves no room for KV blocks; "
                         f"raise gpu_memory_utilization / cache_memory_bytes or lower max_num_seqs")
    return CachePlan(int(num_kv_blocks), int(num_groups))


def cuda_cache_budget(utilization: float, profile_step) -> int:
    """Bytes left for caches once weights and the peak activations of a profiling step are counted."""
    gc.collect()  # an engine this process dropped may still hold its caches until collected
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    profile_step()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    used_by_others = total - free - torch.cuda.memory_reserved()
    budget = int(total * utilization) - peak - max(used_by_others, 0)
    torch.cuda.empty_cache()
    return budget
