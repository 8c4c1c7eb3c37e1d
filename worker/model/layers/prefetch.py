"""Which weights a layer asks the GPU to bring into L2 before it reads them (kernels.prefetch_l2).

At batch 1 the stretch of a layer between its token mixer's input projection and its output
projection (convolution and recurrence, or attention, and their norms) is a chain of short kernels
that barely touch memory. Prefetched at its start, the output projection and the router then read
from cache. The level, `NEXTSERVE_L2_PREFETCH` (read once): 0 none; 1 those (the default); 2 also,
during routing, the next layer's input projections.
"""

import functools
import os

import torch
from torch import nn

from worker import kernels


@functools.cache
def prefetch_level() -> int:
    level = os.environ.get("NEXTSERVE_L2_PREFETCH", "1")
    if level not in ("0", "1", "2"):
        raise ValueError(f"NEXTSERVE_L2_PREFETCH must be 0, 1 or 2, got {level!r}")
    return int(level)


def weights_read(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The weights (and FP8 block scales) that multiplying by these linear modules reads."""
    tensors = []
    for module in modules:
        tensors += [t for t in (module.weight, getattr(module, "weight_scale_inv", None)) if t is not None]
    return tensors


def prefetch(modules: list[nn.Module]) -> None:
    if modules:
        kernels.prefetch_l2(*weights_read(modules))
