"""The all-reduce of a row-parallel output fused with the residual add and zero-centred RMSNorm after
it, over row buffers that every rank of the tensor-parallel group can read (peer memory), torch reference.

Each rank writes its partial rows into its own buffer; once every rank's rows are there, each rank
reads all of them and sums them in rank order 0..N-1, rounded to the activation dtype after each add
(as an add kernel in that dtype rounds, and as torch's one-shot all-reduce sums), then goes on as
kernels.fused_add_rms_norm does. Every rank computes the same bits from the same rows.

A rank's buffer has two halves. Row t of a call goes to half `calls[t] & 1`, where `calls[t]` counts
this rank's calls so far that had a row t (every rank makes the same calls, so all agree on the
half). A rank writes a half's row t again only two calls later, after its peers have arrived at the
call in between: by then they have finished reading it, so a call needs one barrier, not a second
one at its end before the buffer may be written again. The int32 count wraps after 2^31 calls (hours
of decoding at batch 1, two calls a layer); its lowest bit goes on alternating, where a `% 2` in the
kernel would turn negative past the wrap.

The reference does not synchronise: it is the math and the buffer layout, for one process in which
every rank's rows are already in place (the tests). The Triton kernel (triton_one_shot_add_rms_norm)
waits for its peers with flags: rank p sets flags[q][t, p] to 1 once its row t is in place for rank q,
and rank q sets it back to 0 when it has seen it.
"""

from dataclasses import dataclass

import torch

from worker.kernels.add_rms_norm import fused_add_rms_norm


@dataclass(frozen=True)
class PeerRows:
    """The row buffers and flags of every rank of a group, as this process addresses them."""

    rank: int
    rows: list[torch.Tensor]  # per rank: [2, R, H] in the activation dtype, the two halves
    flags: list[torch.Tensor]  # per rank: [R, N] int32, zero between calls
    calls: torch.Tensor  # [R] int32, this rank's calls so far per row (which half is in use), on the device
    row_ptrs: torch.Tensor  # [N] int64: rows[p].data_ptr() in this process, on the device (for the kernel)
    flag_ptrs: torch.Tensor  # [N] int64: flags[p].data_ptr()

    @classmethod
    def build(cls, rank: int, rows: list[torch.Tensor], flags: list[torch.Tensor]) -> "PeerRows":
        world, (halves, max_rows, _) = len(rows), rows[0].shape
        if not 0 <= rank < world or halves != 2 or any(r.shape != rows[0].shape for r in rows):
            raise ValueError(f"rank {rank} of {world} needs each rank's rows as [2, R, H], got "
                             f"{[tuple(r.shape) for r in rows]}")
        if any(r.data_ptr() % 16 or not r.is_contiguous() for r in rows):
            raise ValueError("each rank's rows must be contiguous and start 16-byte aligned")
        if len(flags) != world or any(f.shape != (max_rows, world) or f.dtype != torch.int32 for f in flags):
            raise ValueError(f"each rank's flags must be [{max_rows}, {world}] int32")
        device = rows[rank].device
        return cls(rank, rows, flags, torch.zeros(max_rows, dtype=torch.int32, device=device),
                   torch.tensor([r.data_ptr() for r in rows], dtype=torch.int64, device=device),
                   torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64, device=device))

    @property
    def world(self) -> int:
        return len(self.rows)

    @property
    def max_rows(self) -> int:
        return self.rows[0].shape[1]

    def takes(self, x: torch.Tensor) -> bool:
        """Whether x [T, H] fits these buffers: their dtype and row width, at most R rows."""
        _, max_rows, hidden = self.rows[0].shape
        return x.dim() == 2 and x.dtype == self.rows[0].dtype and 0 < x.shape[0] <= max_rows and x.shape[1] == hidden

    def require(self, x: torch.Tensor) -> None:
        """ValueError unless these buffers take x."""
        if not self.takes(x):
            raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit rows {tuple(self.rows[0].shape)} "
                             f"{self.rows[0].dtype}")


def one_shot_add_rms_norm(
    x: torch.Tensor,  # [T, H] this rank's partial sum of a row-parallel output
    peers: PeerRows,  # every rank's row buffers, with rows [2, R >= T, H] in x's dtype
    residual: torch.Tensor,  # [T, H] the residual stream so far, the same on every rank
    weight: torch.Tensor,  # [H]
    eps: float,
    quant_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], new residual [T, H])
    """fused_add_rms_norm of `residual + (x summed over the ranks in rank order)`; peers' rows must
    already be in their buffers (no synchronisation here)."""
    peers.require(x)
    t = torch.arange(x.shape[0], device=peers.calls.device)
    half = (peers.calls[: x.shape[0]] & 1).long()
    peers.rows[peers.rank][half, t] = x
    total = peers.rows[0][half, t].to(x.device)
    for p in range(1, peers.world):
        total = total + peers.rows[p][half, t].to(x.device)
    peers.calls[: x.shape[0]] += 1
    return fused_add_rms_norm(total, residual, weight, eps, quant_block)
