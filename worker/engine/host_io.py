"""Moving small tensors between the host and the device without stalling the step.

On CUDA a plain `torch.tensor(data, device="cuda")` or `.tolist()` waits for the stream. Here
host data goes through pinned memory with a non-blocking copy, and a step's results come back as
one packed non-blocking copy into pinned memory followed by one event wait: the only wait of a step.
"""

import math

import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or nested lists) -> a tensor on `device`, queued on the current stream on CUDA."""
    host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    return to_device(indices, torch.int64, device)


class _PinnedBuffers:
    """Pinned float64 buffers, each with its event, reused from step to step: a buffer is taken for one
    copy and given back once its values have been read, so none is written while still in use. The
    step loop's host time is its critical path at small batches, and a fresh pinned buffer and event
    per step cost more than the copy."""

    def __init__(self):
        self._free: dict[tuple[int, torch.device], list[tuple[torch.Tensor, torch.cuda.Event]]] = {}

    def take(self, size: int, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A buffer of at least `size` values and an event for `device`'s stream (events belong to a device)."""
        capacity = 1 << max(size - 1, 0).bit_length()
        free = self._free.get((capacity, device))
        if free:
            return free.pop()
        with torch.inference_mode(False):  # a normal tensor: steps write it inside inference mode and out of it
            buffer = torch.empty(capacity, dtype=torch.float64, pin_memory=True)
        return buffer, torch.cuda.Event()

    def give(self, device: torch.device, buffer: torch.Tensor, event: torch.cuda.Event) -> None:
        self._free.setdefault((buffer.numel(), device), []).append((buffer, event))


_PINNED = _PinnedBuffers()


class PendingHostCopy:
    """Tensors of a step queued for the host in one transfer; `result()` waits once and returns lists.

    Every value is packed as float64, which holds token ids (< 2^53) and fp32 logprobs exactly."""

    def __init__(self, tensors: dict[str, torch.Tensor | None]):
        self.names = [name for name, t in tensors.items() if t is not None]
        self.shapes = [tuple(tensors[name].shape) for name in self.names]
        self.dtypes = [tensors[name].dtype for name in self.names]
        self.none = [name for name, t in tensors.items() if t is None]
        self._pinned = None
        self._result: dict[str, list | None] | None = None
        if not self.names:
            self._host = torch.empty(0, dtype=torch.float64)
            return
        parts = [tensors[name].reshape(-1) for name in self.names]
        if not parts[0].is_cuda:
            self._host = torch.cat([part.to(torch.float64) for part in parts])
            return
        total = sum(part.numel() for part in parts)
        packed = torch.empty(total, dtype=torch.float64, device=parts[0].device)
        offset = 0
        for part in parts:  # one converting copy each, no concatenation after
            packed[offset : offset + part.numel()].copy_(part)
            offset += part.numel()
        buffer, event = _PINNED.take(total, packed.device)
        self._pinned = (packed.device, buffer, event)
        self._host = buffer[:total]
        self._host.copy_(packed, non_blocking=True)
        event.record()

    def result(self) -> dict[str, list | None]:
        if self._result is None and self._pinned is not None:
            device, buffer, event = self._pinned
            event.synchronize()
            self._result = self._unpack()
            _PINNED.give(device, buffer, event)  # read into lists: the buffer can serve another step
            self._pinned = None
        elif self._result is None:
            self._result = self._unpack()
        return self._result

    def _unpack(self) -> dict[str, list | None]:
        out: dict[str, list | None] = {name: None for name in self.none}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            size = math.prod(shape)
            values = self._host[offset : offset + size].view(shape)
            offset += size
            out[name] = (values.to(dtype) if dtype.is_floating_point else values.long()).tolist()
        return out
