"""A checkpoint tensor that is read only as far as a rank needs it.

Weight loaders narrow it to their shard; only those bytes are read from the safetensors file, so a
tensor-parallel rank never holds whole tensors it does not own.
"""

import torch


class CheckpointTensor:
    def __init__(self, read_slice, shape: tuple[int, ...], dtype: torch.dtype):
        self._read = read_slice  # (tuple of slices) -> torch.Tensor
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the dtype the model wants; the file's dtype is cast on read

    @classmethod
    def from_safetensors(cls, handle, name: str, dtype: torch.dtype) -> "CheckpointTensor":
        view = handle.get_slice(name)
        return cls(lambda index: view[index], tuple(view.get_shape()), dtype)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> "CheckpointTensor":
        return cls(lambda index: tensor[index], tuple(tensor.shape), dtype or tensor.dtype)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % self.dim()
        index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(self.dim()))
        return self._cast(self._read(index))

    def full(self) -> torch.Tensor:
        return self._cast(self._read(tuple(slice(None) for _ in self.shape)))

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype)
