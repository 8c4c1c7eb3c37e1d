"""Tensor-parallel worker groups: rank 0 schedules and broadcasts each step plan; every rank runs it."""
