"""The tensor-parallel all-reduce, chosen once when the group forms (`choose_all_reduce`).

On CUDA, a message of at most 64 KB (a decode step's hidden states at low batch: 4 KB a token in
bf16 at hidden size 2048) goes through a one-shot all-reduce over peer memory, torch's symmetric
memory: each rank's partial sum is copied into a buffer its peers can read over NVLink, and one
kernel waits on flags in a signal pad until every rank's copy is there, then reads all N buffers
and adds them in rank order 0..N-1, so every rank gets the same bits. It launches on the current
stream into buffers fixed at start-up, so CUDA graphs capture it like any other kernel. NCCL took
16.5 µs a call in a graph (44 µs eager) for one token at tp 2 on 2xH100: with two all-reduces in
each of Qwen3-Next-80B's 48 layers, 1.6 ms a step, more than the step's whole bytes roofline.
Larger messages go through NCCL, and so does everything when symmetric memory is unavailable
(logged once) or turned off (`--disable-custom-all-reduce`). On the CPU, gloo.

NVLink multicast (NVLS) is never used: it is forbidden on the machines we run on. NO_MULTICAST_ENV
is set in every process of a group before NCCL or symmetric memory start, and the one-shot kernel
reads its peers' buffers with plain loads, which need none.

`all_reduce_add_rms_norm` is the all-reduce followed by the residual add and zero-centred RMSNorm
that come after every row-parallel output of the model (worker.model.layers.norm.AllReduceRMSNorm).
With NEXTSERVE_ONE_SHOT_NORM=1 the one-shot path does all three in one kernel
(kernels.one_shot_add_rms_norm: each rank writes its rows into its part of the symmetric buffer, meets
its peers through flags there, then sums, adds and normalises), instead of three launches (the copy,
torch's one-shot all-reduce, the add + norm). It is off by default until a two-GPU machine has run it.
"""

import functools
import logging
import os
from collections.abc import MutableMapping

import torch
import torch.distributed as dist

from worker import kernels
from worker.kernels.one_shot_add_rms_norm import PeerRows

logger = logging.getLogger(__name__)

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MAX_ONE_SHOT_BYTES = 64 << 10
ONE_SHOT_DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot kernel is built for
EPS = 1e-6  # the self-test's norm


@functools.cache
def one_shot_norm_enabled() -> bool:
    """Whether the one-shot all-reduce adds and normalises in its own kernel: NEXTSERVE_ONE_SHOT_NORM=1
    (read once; every rank of a group must see the same value, as the launcher's children do)."""
    return os.environ.get("NEXTSERVE_ONE_SHOT_NORM", "0") == "1"


def forbid_multicast(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set NO_MULTICAST_ENV in `environ`, over any other value (with a warning)."""
    for name, value in NO_MULTICAST_ENV.items():
        if environ.get(name, value) != value:
            logger.warning("%s=%s replaced by %s: NVLink multicast is not used", name, environ[name], value)
        environ[name] = value


class AllReduce:
    """Sums a tensor over the ranks of a tensor-parallel group; one rank: the identity."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """-> x summed over the ranks: x itself, reduced in place."""
        return x

    def all_reduce_add_rms_norm(
        self,
        x: torch.Tensor,  # [T, H] this rank's partial sum of a row-parallel output
        residual: torch.Tensor,  # [T, H] the residual stream so far, the same on every rank
        weight: torch.Tensor,  # [H]
        eps: float,
        quant_block: int | None = None,  # the normed rows' e4m3 groups too, for an FP8 consumer
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
        """The zero-centred RMSNorm of `residual + (x summed over the ranks)` (kernels.fused_add_rms_norm)."""
        return kernels.fused_add_rms_norm(self.all_reduce(x), residual, weight, eps, quant_block)

    def describe(self) -> str:
        return "one rank: no all-reduce"


class GroupAllReduce(AllReduce):
    """torch.distributed's all-reduce over `group` (None: the default group): NCCL on GPUs, gloo on the CPU."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def describe(self) -> str:
        return f"{dist.get_backend(self.group)} for every message"


class OneShotAllReduce(GroupAllReduce):
    """Messages of at most `max_bytes` (bf16 or fp32, contiguous) through torch's one-shot all-reduce
    over a symmetric-memory buffer; the others through `group` (NCCL).

    Building it is a collective over `group` (the buffer's rendezvous); so is every call, and every
    rank makes the same calls with the same shapes, so every rank takes the same path.

    The symmetric buffer holds, in turn: `max_bytes` for torch's one-shot all-reduce; the two halves of
    the fused kernel's rows, `max_bytes` each; its flags, one int32 per rank for each row of at least 16
    bytes. The rows are laid out for the first fused call's width and dtype (the hidden states').
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = MAX_ONE_SHOT_BYTES):
        from torch.distributed import _symmetric_memory as symm_mem

        super().__init__(group)
        if max_bytes % 16:
            raise ValueError(f"max_bytes must be a multiple of 16, got {max_bytes}")
        self.max_bytes = max_bytes
        self.group_name = group.group_name
        self.fuse_norm = one_shot_norm_enabled()
        self.peer_rows: PeerRows | None = None
        world = dist.get_world_size(group)
        self.buffer = symm_mem.empty(3 * max_bytes + self._max_rows(16) * world * 4, dtype=torch.uint8,
                                     device=device).zero_()
        torch.cuda.synchronize(device)
        self.handle = symm_mem.rendezvous(self.buffer, group)
        self.handle.barrier()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not fits_one_shot(x, self.max_bytes):
            return super().all_reduce(x)
        shared = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        # A copy kernel, then the all-reduce, rather than torch's one_shot_all_reduce_copy_out: that
        # kernel signals its peers from each block's first threads before the block's other threads
        # are known to have finished their part of the copy; a kernel boundary orders them.
        shared.copy_(x)
        return torch.ops.symm_mem.one_shot_all_reduce_out(shared, "sum", self.group_name, x)

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, quant_block=None):
        peers = self._peer_rows(x, residual) if self.fuse_norm else None
        if peers is None:
            return super().all_reduce_add_rms_norm(x, residual, weight, eps, quant_block)
        return kernels.one_shot_add_rms_norm(x, peers, residual, weight, eps, quant_block)

    def _max_rows(self, row_bytes: int) -> int:
        return self.max_bytes // row_bytes

    def _peer_rows(self, x: torch.Tensor, residual: torch.Tensor) -> PeerRows | None:
        """The fused kernel's rows if x [T, H] fits them, else None (the unfused path). They are laid out at
        the first call that can have them, never while a CUDA graph is being captured (that copies pointers
        to the device): every rank makes the same calls, so all lay them out at the same one."""
        fits = (x.dim() == 2 and x.dtype in ONE_SHOT_DTYPES and 0 < x.shape[1] * x.element_size() <= self.max_bytes
                and x.stride(1) == 1 and residual.stride(1) == 1)
        if fits and self.peer_rows is None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.peer_rows = self._lay_out_rows(x.shape[1], x.dtype)
        return self.peer_rows if fits and self.peer_rows is not None and self.peer_rows.takes(x) else None

    def _lay_out_rows(self, hidden: int, dtype: torch.dtype) -> PeerRows:
        item, world = dtype.itemsize, dist.get_world_size(self.group)
        max_rows = self._max_rows(max(16, hidden * item))
        rows = [self.handle.get_buffer(p, (2, max_rows, hidden), dtype, self.max_bytes // item) for p in range(world)]
        flags = [self.handle.get_buffer(p, (max_rows, world), torch.int32, 3 * self.max_bytes // 4)
                 for p in range(world)]
        return PeerRows.build(dist.get_rank(self.group), rows, flags)

    def multicast_ptr(self) -> int:
        return int(getattr(self.handle, "multicast_ptr", 0) or 0)

    def self_test(self) -> str | None:
        """Two all-reduces of known values, checked exactly; -> why they were wrong, None if right."""
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        for dtype, numel in ((torch.float32, 1000), (torch.bfloat16, 2048)):
            x = torch.full((numel,), rank + 1, dtype=dtype, device=self.buffer.device)
            expected = size * (size + 1) // 2
            if not bool((self.all_reduce(x) == expected).all()):
                return f"a {dtype} one-shot all-reduce of {numel} values did not sum to {expected}"
        return self._fused_norm_self_test() if self.fuse_norm else None

    def _fused_norm_self_test(self) -> str | None:
        """The fused kernel on rows of known values against the unfused add + norm of their sum, bit for bit.
        Every rank makes every call whatever it finds (a rank that stopped early would leave its peers
        waiting in the kernel), and the rows laid out here are dropped once every rank is done with them."""
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        device, wrong = self.buffer.device, []
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.full((3, 256), rank + 1, dtype=dtype, device=device)
            residual, weight = torch.ones_like(x), torch.zeros(256, dtype=dtype, device=device)
            expected = kernels.fused_add_rms_norm(torch.full_like(x, size * (size + 1) // 2), residual, weight, EPS)
            for _ in range(2):  # both halves of the rows
                normed, new_residual = self.all_reduce_add_rms_norm(x, residual, weight, EPS)
                if not (torch.equal(normed, expected[0]) and torch.equal(new_residual, expected[1])):
                    wrong.append(f"the fused one-shot all-reduce + add + norm of {dtype} rows was wrong")
            self.drop_rows()
        return wrong[0] if wrong else None

    def drop_rows(self) -> None:
        """Forget the fused kernel's row layout, once every rank has finished its calls (a collective), so the
        next call lays them out for its own width and dtype."""
        torch.cuda.synchronize(self.buffer.device)
        self.handle.barrier()
        torch.cuda.synchronize(self.buffer.device)
        self.peer_rows = None

    def describe(self) -> str:
        fused = ", the add + norm in its kernel" if self.fuse_norm else ""
        return f"one-shot over peer memory up to {self.max_bytes >> 10} KB (bf16, fp32){fused}, NCCL above"


def fits_one_shot(x: torch.Tensor, max_bytes: int) -> bool:
    """Whether torch's one-shot kernel takes x: bf16 or fp32, contiguous, at most `max_bytes`, in whole
    4-byte words (it moves 4, 8 or 16 bytes at a time, as the size allows), at a 16-byte aligned
    offset (the sum is stored into x with the same vector width as it is read from the buffer)."""
    num_bytes = x.numel() * x.element_size()
    return (x.dtype in ONE_SHOT_DTYPES and 0 < num_bytes <= max_bytes and num_bytes % 4 == 0 and x.is_contiguous()
            and x.storage_offset() * x.element_size() % 16 == 0)


def choose_all_reduce(group: dist.ProcessGroup, device: torch.device, control_group: dist.ProcessGroup,
                      disable_custom: bool = False) -> AllReduce:
    """The all-reduce for `group`'s tensors on `device` (every rank calls this once, after the group
    formed). After each step of setting up the one-shot path (support, rendezvous, a self-test) the
    ranks agree over `control_group` (gloo) before the next, so all take it, or all fall back to NCCL
    at the same step: a rank alone in a one-shot kernel would wait for its peers forever."""
    if dist.get_world_size(group) == 1:
        return AllReduce()
    fallback = GroupAllReduce(group)
    if device.type != "cuda":
        return fallback
    if disable_custom:
        logger.info("all-reduce: NCCL for every message (the custom all-reduce is disabled)")
        return fallback
    reason = _why_unsupported(device, dist.get_world_size(group))
    if not _every_rank_ok(reason, control_group):
        return _fall_back(fallback, reason)
    try:
        one_shot = OneShotAllReduce(group, device)
        if one_shot.multicast_ptr():
            reason = "symmetric memory mapped an NVLink multicast object, which must not be used"
    except Exception as e:  # RuntimeError from torch; anything else from builds without it
        reason = f"symmetric memory could not be set up ({type(e).__name__}: {e})"
    if not _every_rank_ok(reason, control_group):
        return _fall_back(fallback, reason)
    try:
        reason = one_shot.self_test()
    except Exception as e:
        reason = f"the one-shot all-reduce failed ({type(e).__name__}: {e})"
    if not _every_rank_ok(reason, control_group):
        return _fall_back(fallback, reason)
    logger.info("all-reduce: %s", one_shot.describe())
    return one_shot


def _fall_back(fallback: GroupAllReduce, reason: str | None) -> GroupAllReduce:
    logger.warning("all-reduce: NCCL for every message; the one-shot peer-memory all-reduce is unavailable: %s",
                   reason or "not on every rank (see the other ranks' logs)")
    return fallback


def _why_unsupported(device: torch.device, size: int) -> str | None:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401

        has_one_shot = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
    except (ImportError, RuntimeError):
        has_one_shot = False
    if not has_one_shot:
        return f"torch {torch.__version__} has no symmetric-memory one-shot all-reduce"
    # Ranks run on cuda:0..size-1 of one host (worker.parallel.group.rank_device).
    index = torch.cuda.current_device() if device.index is None else device.index
    for peer in range(size):
        if peer != index and not torch.cuda.can_device_access_peer(index, peer):
            return f"cuda:{index} cannot access cuda:{peer}'s memory (no peer access)"
    return None


def _every_rank_ok(reason: str | None, control_group: dist.ProcessGroup) -> bool:
    ok = torch.tensor([int(reason is None)], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=control_group)
    return bool(ok.item())
