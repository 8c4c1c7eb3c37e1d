"""Linear layers that own their tensor-parallel shard and know how to load it.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's slice
of a checkpoint tensor (a CheckpointTensor: only the narrowed part is read from disk); the checkpoint
loader only maps names to parameters.

Where the checkpoint stores a layer's weight in FP8 (a `quant_config` that does not exempt the
layer's `prefix`), the layer holds it as stored: float8_e4m3fn plus the block scales
`weight_scale_inv`, sharded in whole blocks, and multiplies through `kernels.fp8_block_linear`.
"""

import torch
from torch import nn

from worker import kernels
from worker.config import Fp8Config
from worker.distributed import get_tp
from worker.model.layers.checkpoint_tensor import CheckpointTensor
from worker.model.layers.fp8 import (check_whole_blocks, checkpoint_shape, fp8_block, fp8_parameters, narrow,
                                     whole_block_order)


def _check_shape(param: torch.Tensor, loaded: CheckpointTensor, name: str = "") -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch{' for ' + name if name else ''}: checkpoint has "
                         f"{tuple(loaded.shape)}, model expects {tuple(param.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id=None) -> None:
    _check_shape(param, loaded)
    param.data.copy_(loaded.full())


def _linear(x, weight, weight_scale_inv, block: int | None, bias):
    if block is None:
        return kernels.linear(x, weight, bias)
    return kernels.fp8_block_linear(x, weight, weight_scale_inv, block, bias)


class _Linear(nn.Module):
    """This rank's weight [out_per_rank, in_per_rank] of a full [out_features, in_features] one."""

    def __init__(self, in_features: int, out_features: int, in_per_rank: int, out_per_rank: int, bias: bool,
                 quant_config: Fp8Config | None, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.full_shape = (out_features, in_features)
        self.block = fp8_block(quant_config, prefix)
        if self.block is None:
            self.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank), requires_grad=False)
            self.weight_scale_inv = None
        else:
            self.weight, self.weight_scale_inv = fp8_parameters((out_per_rank, in_per_rank), self.block)
            self.weight_scale_inv.weight_loader = self.weight_loader
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def _shard(self, param: nn.Parameter, loaded: CheckpointTensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id=None) -> None:
        expected = (self.full_shape[0],) if param is self.bias else checkpoint_shape(param, self.full_shape)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {expected}"
                             f"{' before sharding' if get_tp().size > 1 else ''}")
        shard = self._shard(param, loaded)
        _check_shape(param, shard)
        param.data.copy_(shard)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _linear(x, self.weight, self.weight_scale_inv, self.block, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ReplicatedLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__(in_features, out_features, in_features, out_features, bias, quant_config, prefix)

    def _shard(self, param, loaded):
        return loaded.full()


class ColumnParallelLinear(_Linear):
    """Output rows split across ranks; `shard_rows` maps a full checkpoint tensor to this rank's rows.

    `replicas` > 1 lets several ranks hold the same rows (KV heads when tp > num_kv_heads).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, replicas: int = 1,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        tp = get_tp()
        self.num_shards = tp.size // replicas
        self.shard_rank = tp.rank // replicas
        if out_features % self.num_shards:
            raise ValueError(f"tensor parallel size {tp.size} does not divide output features {out_features}")
        self.out_per_rank = out_features // self.num_shards
        super().__init__(in_features, out_features, in_features, self.out_per_rank, bias, quant_config, prefix)
        check_whole_blocks(prefix, "output rows", self.out_per_rank, out_features, self.num_shards, self.block,
                           tp.size)

    def shard_rows(self, param: nn.Parameter, loaded: CheckpointTensor) -> torch.Tensor:
        return narrow(param, loaded, 0, self.shard_rank * self.out_per_rank, self.out_per_rank)

    def reorder_output_rows(self, order: torch.Tensor) -> bool:
        """Once loaded: this rank's output features in `order` (new feature j = old feature order[j]).
        An FP8 weight can only move whole blocks of rows, since each scale covers a block: where `order`
        does not, nothing changes and the result is False."""
        order = order.to(self.weight.device)
        if self.block is not None:
            blocks = whole_block_order(order, self.block)
            if blocks is None:
                return False
            self.weight_scale_inv.data = self.weight_scale_inv.data.index_select(0, blocks)
        weight = self.weight.data
        rows = weight.view(torch.uint8) if self.block is not None else weight  # no float8 index_select
        self.weight.data = rows.index_select(0, order).view(weight.dtype)
        if self.bias is not None:
            self.bias.data = self.bias.data.index_select(0, order)
        return True

    def _shard(self, param, loaded):
        return self.shard_rows(param, loaded)


class RowParallelLinear(_Linear):
    """Input columns split across ranks; the partial products are summed by an all-reduce, or, with
    `reduce_results=False`, by the caller (AllReduceRMSNorm, which reduces, adds and normalises)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        self.tp = tp = get_tp()
        self.in_per_rank = tp.shard(in_features, "input features")
        self.reduce_results = reduce_results
        super().__init__(in_features, out_features, self.in_per_rank, out_features, bias, quant_config, prefix)
        check_whole_blocks(prefix, "input columns", self.in_per_rank, in_features, tp.size, self.block, tp.size)

    def _shard(self, param, loaded):
        if param is self.bias:
            return loaded.full()
        return narrow(param, loaded, -1, self.tp.rank * self.in_per_rank, self.in_per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bias is added once, so it is not counted tp times: after the reduction, or by rank 0 alone
        # when the caller reduces.
        y = self._matmul(x, None)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        elif self.tp.rank > 0:
            return y
        return y if self.bias is None else y + self.bias


class MergedColumnLinear(nn.Module):
    """Column-parallel linears that read the same input, multiplied as one GEMM once loaded.

    Their weights (FP8 block scales, biases) are stacked by output rows into one tensor, and each
    part's parameters become views of its rows, so the parts still read and load as before. At
    decode sizes a GEMM costs a launch and a fixed overhead whatever its rows, so fewer launches
    is the point. `of(parts)` is None where the parts cannot be stacked.
    """

    def __init__(self, parts: list[_Linear]):
        super().__init__()
        first = parts[0]
        self.block = first.block
        self.sizes = [part.weight.shape[0] for part in parts]
        for name in ("weight", "weight_scale_inv", "bias"):
            tensors = [getattr(part, name) for part in parts]
            merged = None if tensors[0] is None else _stack_rows([t.data for t in tensors])
            self.register_buffer(name, merged, persistent=False)
            if merged is not None:
                for tensor, rows in zip(tensors, merged.split([t.shape[0] for t in tensors])):
                    tensor.data = rows

    @classmethod
    def of(cls, parts: list[_Linear]) -> "MergedColumnLinear | None":
        """None unless every part holds the same kind of weight (the same FP8 block, or none), over the
        same inputs, each with or each without a bias, and FP8 parts hold whole blocks of rows."""
        first = parts[0]
        same = all(p.block == first.block and p.weight.shape[1] == first.weight.shape[1]
                   and p.weight.dtype == first.weight.dtype and (p.bias is None) == (first.bias is None)
                   for p in parts)
        whole = first.block is None or all(p.weight.shape[0] % first.block == 0 for p in parts)
        return cls(parts) if same and whole else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs, as column views of one [T, sum of rows] result."""
        return _linear(x, self.weight, self.weight_scale_inv, self.block, self.bias).split(self.sizes, dim=-1)


class Fp8AndDenseColumns(nn.Module):
    """An FP8 and a dense column-parallel linear that read the same input, as the published FP8 checkpoints
    keep a GDN's in_proj_ba in bf16 beside its FP8 in_proj_qkvz: at decode sizes one launch multiplies
    both (kernels.fp8_block_linear_with_dense), else two. The parts keep their parameters; they are held
    here in a tuple, so they are not registered twice."""

    def __init__(self, fp8_part: _Linear, dense_part: _Linear):
        super().__init__()
        self.parts = (fp8_part, dense_part)

    @classmethod
    def of(cls, parts: list[_Linear]) -> "Fp8AndDenseColumns | None":
        """None unless the parts are an FP8 and then a dense layer over the same inputs, neither with a bias."""
        if len(parts) != 2:
            return None
        fp8_part, dense_part = parts
        fits = (fp8_part.block is not None and dense_part.block is None and fp8_part.bias is None
                and dense_part.bias is None and fp8_part.weight.shape[1] == dense_part.weight.shape[1])
        return cls(fp8_part, dense_part) if fits else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fp8_part, dense_part = self.parts
        return kernels.fp8_block_linear_with_dense(x, fp8_part.weight, fp8_part.weight_scale_inv, fp8_part.block,
                                                   dense_part.weight)


def _stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    dtype = tensors[0].dtype
    if dtype.itemsize == 1 and dtype.is_floating_point:  # no float8 cat on every device: move the bytes
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(dtype)
    return torch.cat(tensors)


def project_columns(merged: MergedColumnLinear | None, parts: list[_Linear],
                    x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts' outputs for input x: through their merged GEMM where there is one, else part by part."""
    return merged(x) if merged is not None else tuple(part(x) for part in parts)
