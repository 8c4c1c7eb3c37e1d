"""Programmatic dependent launch (PDL) for the decode-path kernels, on Hopper and later.

A decode step is a chain of some fifty short kernels, and between two of them the GPU would sit idle
while the second is launched and its programs are placed. Launched as a programmatic dependent
launch, the next kernel's programs are placed while this one still runs: each kernel waits
(`griddepcontrol.wait`) for the one before it to have completed and flushed its writes before it
reads any activation, then at once lets the one after it be placed (`launch_dependents`). So at
most one kernel runs ahead, and what a kernel may do before its wait is only to read weights.
A kernel that is not launched this way (cuBLAS, torch's own) keeps the ordinary stream order, and
a wait in a kernel launched the ordinary way returns at once.

`NEXTSERVE_PDL=0` turns it off (read once per process); so do the interpreter and older GPUs.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from worker.kernels.triton_gated_delta_rule_chunked import _interpreting


@functools.cache
def use_pdl(device: torch.device) -> bool:
    """On sm_90+ unless NEXTSERVE_PDL=0; never in the interpreter, which has no griddepcontrol."""
    return (device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(device)[0] >= 9
            and os.environ.get("NEXTSERVE_PDL", "1") != "0")


def pdl_launch(device: torch.device) -> dict:
    """The keyword arguments a decode kernel's launch takes: its PDL flag and the launch attribute."""
    pdl = use_pdl(device)
    return dict(PDL=pdl, launch_pdl=pdl)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait for the kernel before to finish, then let the kernel after be placed (see the module)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
