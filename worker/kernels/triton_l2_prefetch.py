"""L2 prefetch of whole tensors, Triton (torch reference: worker.kernels.l2_prefetch, a no-op).

One launch covers up to MAX_REGIONS tensors. Each program is one warp whose 32 lanes each issue one
bulk prefetch (`cp.async.bulk.prefetch.L2`, Hopper's TMA; fire and forget: nothing waits for the bytes)
of CHUNK bytes, so the requests leave from many multiprocessors at once. Launched as a programmatic
dependent launch, the programs issue their requests while the kernel before still runs, then wait for it
and let the next one in: the prefetch adds almost nothing to the chain it sits in.

Where bulk prefetch does not exist (the interpreter, GPUs before sm_90) or NEXTSERVE_L2_PREFETCH=0,
nothing is launched.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule_chunked import _interpreting

CHUNK = 4096  # bytes per lane and request
LANES = 32
MAX_REGIONS = 4
ALIGN = 16  # bulk copies take 16-byte aligned addresses and sizes in multiples of 16


@functools.cache
def prefetch_enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(device)[0] >= 9
            and os.environ.get("NEXTSERVE_L2_PREFETCH", "1") != "0")


@triton.jit
def _bulk_prefetch_l2(address, size):
    """One request per element; a zero size issues none."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(a0, n0, a1, n1, a2, n2, a3, n3, CHUNK_: tl.constexpr, LANES_: tl.constexpr,
                        PDL: tl.constexpr):
    region = tl.program_id(1)
    address = tl.where(region == 0, a0, tl.where(region == 1, a1, tl.where(region == 2, a2, a3)))
    nbytes = tl.where(region == 0, n0, tl.where(region == 1, n1, tl.where(region == 2, n2, n3)))
    start = (tl.program_id(0).to(tl.int64) * LANES_ + tl.arange(0, LANES_)) * CHUNK_
    size = tl.minimum(tl.maximum(nbytes - start, 0), CHUNK_) // 16 * 16
    _bulk_prefetch_l2(address + start, size.to(tl.int32))
    pdl_enter(PDL)


def _region(t: torch.Tensor) -> tuple[int, int]:
    """(aligned start address, bytes) of a tensor's storage span; an empty or unaligned one gives no bytes."""
    nbytes = t.numel() * t.element_size() if t.is_contiguous() else 0
    address = t.data_ptr()
    return (address, nbytes) if address % ALIGN == 0 else (address, 0)


def prefetch_l2(*tensors: torch.Tensor) -> None:
    """Prefetch the bytes of contiguous CUDA tensors into L2 (a hint: values never change), MAX_REGIONS
    tensors per launch."""
    if not tensors or not prefetch_enabled(tensors[0].device):
        return
    for first in range(0, len(tensors), MAX_REGIONS):
        _launch([_region(t) for t in tensors[first : first + MAX_REGIONS]], tensors[0].device)


def _launch(regions: list[tuple[int, int]], device: torch.device) -> None:
    largest = max(n for _, n in regions)
    if largest == 0:
        return
    regions = regions + [(0, 0)] * (MAX_REGIONS - len(regions))
    args = [v for region in regions for v in region]
    _l2_prefetch_kernel[(triton.cdiv(largest, CHUNK * LANES), MAX_REGIONS)](
        *args, CHUNK_=CHUNK, LANES_=LANES, num_warps=1, **pdl_launch(device))
