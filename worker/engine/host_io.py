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


class PendingHostCopy:
    """Tensors of a step queued for the host in one transfer; `result()` waits once and returns lists.

    Every value is packed as float64, which holds token ids (< 2^53) and fp32 logprobs exactly."""

    def __init__(self, tensors: dict[str, torch.Tensor | None]):
        self.names = [name for name, t in tensors.items() if t is not None]
        self.shapes = [tuple(tensors[name].shape) for name in self.names]
        self.dtypes = [tensors[name].dtype for name in self.names]
        self.none = [name for name, t in tensors.items() if t is None]
        self._event = None
        if not self.names:
            self._host = torch.empty(0, dtype=torch.float64)
            return
        packed = torch.cat([tensors[name].reshape(-1).to(torch.float64) for name in self.names])
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> dict[str, list | None]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        out: dict[str, list | None] = {name: None for name in self.none}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            size = math.prod(shape)
            values = self._host[offset : offset + size].view(shape)
            offset += size
            out[name] = (values.to(dtype) if dtype.is_floating_point else values.long()).tolist()
        return out
