"""Warming the GPU's L2 cache with weights a later kernel of the step will read, torch reference.

At batch 1 a decode step is a chain of short kernels, and most of them (norms, the convolution, the
recurrence, routing) wait on latency while the memory bus idles. A prefetch launched before such a
stretch streams the weights of the projection after it into L2, so that projection reads them from
cache. It is a hint: no value changes, so the reference does nothing.
"""

import torch


def prefetch_l2(*tensors: torch.Tensor) -> None:
    """Ask for each tensor's bytes to be brought into L2; no effect on any value."""
