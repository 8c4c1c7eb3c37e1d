"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE with a gated shared expert."""

import torch
from torch import nn

from worker import kernels
from worker.config import ModelConfig
from worker.distributed import get_tp
from worker.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, reduce_results: bool = True):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts' weights stacked: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I].

    Experts are split along the intermediate size across ranks (TP-MoE). The checkpoint stores
    each expert separately (`experts.{e}.{gate,up,down}_proj.weight`); shard_id is (e, name).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp = get_tp()
        self.inter = self.tp.shard(intermediate_size, "moe_intermediate_size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        expert, name = shard_id
        hidden, full_inter = param.shape[-1] if name != "down_proj" else param.shape[1], self.inter * self.tp.size
        expected = (hidden, full_inter) if name == "down_proj" else (full_inter, hidden)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch for expert {expert} {name}: checkpoint has {tuple(loaded.shape)}, "
                             f"model expects {expected}")
        start = self.tp.rank * self.inter
        if name == "down_proj":
            param.data[expert].copy_(loaded.narrow(1, start, self.inter))
        else:
            offset = 0 if name == "gate_proj" else self.inter
            param.data[expert, offset : offset + self.inter].copy_(loaded.narrow(0, start, self.inter))

    def forward(self, x, topk_weights, topk_ids):
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tp = get_tp()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = kernels.select_experts(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)
