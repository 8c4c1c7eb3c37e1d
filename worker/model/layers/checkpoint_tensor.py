"""A checkpoint tensor that is read only as far as a rank needs it.

Weight loaders narrow it to their shard; only those bytes are read from the safetensors file, so a
tensor-parallel rank never holds whole tensors it does not own.
"""

import torch


# safetensors' dtype names -> torch dtypes (those a checkpoint of ours can hold).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointTensor:
    def __init__(self, read_slice, shape: tuple[int, ...], dtype: torch.dtype, stored_dtype: torch.dtype):
        self._read = read_slice  # (tuple of slices) -> torch.Tensor
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the dtype the model wants; the file's dtype is cast on read
        self.stored_dtype = stored_dtype

    @classmethod
    def from_safetensors(cls, handle, name: str, dtype: torch.dtype) -> "CheckpointTensor":
        view = handle.get_slice(name)
        stored = view.get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(f"unsupported safetensors dtype {stored}")
        return cls(lambda index: view[index], tuple(view.get_shape()), dtype, SAFETENSORS_DTYPES[stored])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> "CheckpointTensor":
        return cls(lambda index: tensor[index], tuple(tensor.shape), dtype or tensor.dtype, tensor.dtype)

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
