"""Linear layers that own their tensor-parallel shard and know how to load it.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's slice
of a checkpoint tensor (a CheckpointTensor: only the narrowed part is read from disk); the checkpoint
loader only maps names to parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from worker.distributed import get_tp
from worker.model.layers.checkpoint_tensor import CheckpointTensor


def _check_shape(param: torch.Tensor, loaded: CheckpointTensor, name: str = "") -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch{' for ' + name if name else ''}: checkpoint has "
                         f"{tuple(loaded.shape)}, model expects {tuple(param.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: CheckpointTensor, shard_id=None) -> None:
    _check_shape(param, loaded)
    param.data.copy_(loaded.full())


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output rows split across ranks; `shard_rows` maps a full checkpoint tensor to this rank's rows.

    `replicas` > 1 lets several ranks hold the same rows (KV heads when tp > num_kv_heads).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, replicas: int = 1):
        super().__init__()
        tp = get_tp()
        self.num_shards = tp.size // replicas
        self.shard_rank = tp.rank // replicas
        if out_features % self.num_shards:
            raise ValueError(f"tensor parallel size {tp.size} does not divide output features {out_features}")
        self.out_per_rank = out_features // self.num_shards
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def shard_rows(self, loaded: CheckpointTensor) -> torch.Tensor:
        return loaded.narrow(0, self.shard_rank * self.out_per_rank, self.out_per_rank)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id=None) -> None:
        if loaded.shape[0] != self.out_per_rank * self.num_shards:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects "
                             f"({self.out_per_rank * self.num_shards}, ...) before sharding")
        shard = self.shard_rows(loaded)
        _check_shape(param, shard)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input columns split across ranks; the partial products are summed by an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True):
        super().__init__()
        tp = get_tp()
        self.tp = tp
        self.in_per_rank = tp.shard(in_features, "input features")
        self.reduce_results = reduce_results
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id=None) -> None:
        if loaded.shape[-1] != self.in_per_rank * self.tp.size:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects "
                             f"(..., {self.in_per_rank * self.tp.size}) before sharding")
        shard = loaded.narrow(-1, self.tp.rank * self.in_per_rank, self.in_per_rank)
        _check_shape(param, shard)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bias is added once, after the reduction, so it is not counted tp times.
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
