"""Bookkeeping of KV blocks and GDN state slot groups: integer ids only, no tensors."""

from collections import deque

from worker.engine.sequence import Sequence


class CacheManager:
    """KV blocks are per token (block_size positions each); a GDN slot group (one conv state and
    1+k recurrent states) is per running sequence, whatever its length."""

    def __init__(self, num_blocks: int, block_size: int, num_state_groups: int):
        if num_blocks < 1 or num_state_groups < 1:
            raise ValueError(f"cache too small: {num_blocks} KV blocks, {num_state_groups} GDN slot groups")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_state_groups = num_state_groups
        self._free_blocks = deque(range(num_blocks))
        self._free_groups = deque(range(num_state_groups))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_state_groups(self) -> int:
        return len(self._free_groups)

    def blocks_needed(self, seq: Sequence, num_positions: int) -> int:
        """Extra blocks for seq to hold KV at positions 0 .. num_positions-1."""
        total = (num_positions + self.block_size - 1) // self.block_size
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_positions: int) -> bool:
        needs_group = seq.state_group is None
        return (self.blocks_needed(seq, num_positions) <= self.num_free_blocks
                and (not needs_group or self.num_free_state_groups > 0))

    def allocate(self, seq: Sequence, num_positions: int) -> None:
        if not self.can_allocate(seq, num_positions):
            raise RuntimeError(f"request {seq.request_id}: allocate() called without room; check can_allocate()")
        if seq.state_group is None:
            seq.state_group = self._free_groups.popleft()
            seq.num_accepted_slot = 1
        for _ in range(self.blocks_needed(seq, num_positions)):
            seq.block_table.append(self._free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self._free_blocks.extend(seq.block_table)
        seq.block_table = []
        if seq.state_group is not None:
            self._free_groups.append(seq.state_group)
            seq.state_group = None
