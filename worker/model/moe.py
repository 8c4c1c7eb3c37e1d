"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE with a gated shared expert.

When the shared expert is as wide as a routed one (Qwen3-Next and Qwen3.5 are), it is stored as
one more expert, the last, and `shared_expert_gate` as one more router row: one router GEMM, one
routing kernel and one fused MoE serve the whole block, the shared slot weighted by
`sigmoid(gate)`. Otherwise the shared expert stays a dense MLP beside the routed ones.
"""

import torch
from torch import nn

from worker import kernels
from worker.config import ModelConfig
from worker.distributed import get_tp
from worker.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, _check_shape

SHARED = "shared"  # shard id of the fused shared expert and of its gate row


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, reduce_results: bool = True):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts' weights stacked: w13 [E + S, 2I, H] (gate rows, then up rows) and w2 [E + S, H, I],
    the S (0 or 1) fused shared experts last.

    Experts are split along the intermediate size across ranks (TP-MoE). The checkpoint stores
    each expert separately (`experts.{e}.{gate,up,down}_proj.weight`); shard_id is (e, name), with
    e = "shared" for `shared_expert.{name}.weight`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, num_shared: int = 0):
        super().__init__()
        self.tp = get_tp()
        self.num_routed = num_experts
        self.inter = self.tp.shard(intermediate_size, "moe_intermediate_size")
        total = num_experts + num_shared
        self.w13 = nn.Parameter(torch.empty(total, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(total, hidden_size, self.inter), requires_grad=False)
        ids = list(range(num_experts)) + [SHARED] * num_shared
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        self.w13.expected_shards = [(e, p) for e in ids for p in ("gate_proj", "up_proj")]
        self.w2.expected_shards = [(e, "down_proj") for e in ids]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        expert, name = shard_id
        index = self.num_routed if expert == SHARED else expert
        what = "the shared expert" if expert == SHARED else f"expert {expert}"
        hidden, full_inter = param.shape[-1] if name != "down_proj" else param.shape[1], self.inter * self.tp.size
        expected = (hidden, full_inter) if name == "down_proj" else (full_inter, hidden)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch for {what} {name}: checkpoint has {tuple(loaded.shape)}, "
                             f"model expects {expected}")
        start = self.tp.rank * self.inter
        if name == "down_proj":
            param.data[index].copy_(loaded.narrow(1, start, self.inter))
        else:
            offset = 0 if name == "gate_proj" else self.inter
            param.data[index, offset : offset + self.inter].copy_(loaded.narrow(0, start, self.inter))

    def forward(self, x, topk_weights, topk_ids):
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class Router(ReplicatedLinear):
    """`mlp.gate` [E, H], with `shared_expert_gate` [1, H] as row E when the shared expert is fused."""

    def __init__(self, hidden_size: int, num_experts: int, with_shared_gate: bool):
        super().__init__(hidden_size, num_experts + int(with_shared_gate))
        self.num_experts = num_experts
        self.weight.weight_loader = self.weight_loader
        self.weight.expected_shards = [None, SHARED] if with_shared_gate else [None]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = param.data[self.num_experts:] if shard_id == SHARED else param.data[: self.num_experts]
        _check_shape(rows, loaded)
        rows.copy_(loaded.full())


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tp = get_tp()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        shared = config.shared_expert_intermediate_size
        self.fuse_shared = shared == config.moe_intermediate_size
        self.gate = Router(config.hidden_size, config.num_experts, self.fuse_shared)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               num_shared=int(self.fuse_shared))
        self.shared_expert = None
        if shared > 0 and not self.fuse_shared:
            self.shared_expert = DenseMLP(config.hidden_size, shared, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = kernels.select_experts(self.gate(x), self.top_k, self.renormalize,
                                                        shared_gate=self.fuse_shared)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)
