"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE with a gated shared expert.

When the shared expert is as wide as a routed one (Qwen3-Next and Qwen3.5 are), it is stored as
one more expert, the last, and `shared_expert_gate` as one more router row: one router GEMM, one
routing kernel and one fused MoE serve the whole block, the shared slot weighted by
`sigmoid(gate)`. Otherwise (or when the checkpoint quantises it differently from the routed
experts) the shared expert stays a dense MLP beside the routed ones.

FP8 checkpoints: the experts are stacked in float8_e4m3fn with their block scales, w13_scale_inv
[E + S, 2I/b, ceil(H/b)] and w2_scale_inv [E + S, ceil(H/b), I/b]. Where this rank's I is not a
multiple of the block b (tiny test models at tp 1), gate and up are each padded with zero rows to
one, so that no block holds rows of both; a rank that would hold part of a block is refused. The
router stays in the activation dtype, as in the published checkpoints.
"""

import torch
from torch import nn

from worker import kernels
from worker.config import Fp8Config, ModelConfig
from worker.distributed import get_tp
from worker.kernels.fp8.quant import cdiv
from worker.model.layers.fp8 import (
    check_whole_blocks, checkpoint_shape, fp8_parameters, is_block_scale, narrow, require_unquantized,
    uniform_fp8_block,
)
from worker.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, _check_shape

SHARED = "shared"  # shard id of the fused shared expert and of its gate row


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, reduce_results: bool = True,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, quant_config=quant_config,
                                              prefix=f"{prefix}.gate_proj")
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, quant_config=quant_config,
                                            prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce_results=reduce_results,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    @property
    def fp8_input_block(self) -> int | None:
        """The FP8 block of the layer reading this module's input, None if it is not FP8 (norm.RMSNorm)."""
        return self.gate_proj.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts' weights stacked: w13 [E + S, 2I, H] (gate rows, then up rows) and w2 [E + S, H, I],
    the S (0 or 1) fused shared experts last; in FP8 (`block` set) with their block scales.

    Experts are split along the intermediate size across ranks (TP-MoE). The checkpoint stores
    each expert separately (`experts.{e}.{gate,up,down}_proj.weight`, and `.weight_scale_inv`);
    shard_id is (e, name), with e = "shared" for `shared_expert.{name}.*`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, num_shared: int = 0,
                 block: int | None = None, prefix: str = ""):
        super().__init__()
        self.tp = get_tp()
        self.num_routed = num_experts
        self.hidden = hidden_size
        self.inter = self.tp.shard(intermediate_size, "moe_intermediate_size")
        self.block = block
        what = "intermediate rows of each expert"
        if num_shared:
            what += " (the routed ones and the fused shared expert)"
        check_whole_blocks(prefix, what, self.inter, intermediate_size, self.tp.size, block, self.tp.size)
        self.inter_padded = self.inter if block is None else cdiv(self.inter, block) * block
        total, inter = num_experts + num_shared, self.inter_padded
        if block is None:
            self.w13 = nn.Parameter(torch.empty(total, 2 * inter, hidden_size), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(total, hidden_size, inter), requires_grad=False)
            self.w13_scale_inv = self.w2_scale_inv = None
            params = [self.w13, self.w2]
        else:
            self.w13, self.w13_scale_inv = fp8_parameters((total, 2 * inter, hidden_size), block)
            self.w2, self.w2_scale_inv = fp8_parameters((total, hidden_size, inter), block)
            if inter != self.inter:
                self.w13.data.zero_()
                self.w2.data.zero_()
            params = [self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv]
        ids = list(range(num_experts)) + [SHARED] * num_shared
        for param in params:
            param.weight_loader = self.weight_loader
            down = param is self.w2 or param is self.w2_scale_inv
            param.expected_shards = [(e, p) for e in ids for p in (("down_proj",) if down else PROJECTIONS[:2])]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        expert, name = shard_id
        index = self.num_routed if expert == SHARED else expert
        what = "the shared expert" if expert == SHARED else f"expert {expert}"
        full_inter = self.inter * self.tp.size
        weight_shape = (self.hidden, full_inter) if name == "down_proj" else (full_inter, self.hidden)
        expected = checkpoint_shape(param, weight_shape)
        if tuple(loaded.shape) != expected:
            kind = " scale" if is_block_scale(param) else ""
            raise ValueError(f"shape mismatch for {what} {name}{kind}: checkpoint has {tuple(loaded.shape)}, "
                             f"model expects {expected}")
        start = self.tp.rank * self.inter
        if name == "down_proj":
            shard = narrow(param, loaded, 1, start, self.inter)
            param.data[index, :, : shard.shape[1]].copy_(shard)
        else:
            offset = 0 if name == "gate_proj" else self.inter_padded
            if is_block_scale(param):
                offset //= self.block
            shard = narrow(param, loaded, 0, start, self.inter)
            param.data[index, offset : offset + shard.shape[0]].copy_(shard)

    def forward(self, x, topk_weights, topk_ids):
        if self.block is None:
            return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return kernels.fused_moe_fp8(x, self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv, topk_weights,
                                     topk_ids, self.block)


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
    def __init__(self, config: ModelConfig, prefix: str, reduce_results: bool = True):
        super().__init__()
        self.tp = get_tp()
        self.reduce_results = reduce_results
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        quant, shared = config.quantization, config.shared_expert_intermediate_size
        block = uniform_fp8_block(quant, [f"{prefix}.experts.{e}.{p}" for e in range(config.num_experts)
                                          for p in PROJECTIONS], f"{prefix}.experts")
        shared_block = uniform_fp8_block(quant, [f"{prefix}.shared_expert.{p}" for p in PROJECTIONS],
                                         f"{prefix}.shared_expert")
        self.fuse_shared = shared == config.moe_intermediate_size and shared_block == block
        for name in ("gate", "shared_expert_gate") if self.fuse_shared else ("gate",):
            require_unquantized(quant, f"{prefix}.{name}", "the router")
        self.gate = Router(config.hidden_size, config.num_experts, self.fuse_shared)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               num_shared=int(self.fuse_shared), block=block, prefix=f"{prefix}.experts")
        self.shared_expert = None
        if shared > 0 and not self.fuse_shared:
            self.shared_expert = DenseMLP(config.hidden_size, shared, reduce_results=False, quant_config=quant,
                                          prefix=f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, quant_config=quant,
                                                       prefix=f"{prefix}.shared_expert_gate")

    @property
    def fp8_input_block(self) -> int | None:
        """The experts' FP8 block (the shared expert's where only it is FP8), else None (norm.RMSNorm)."""
        return self.experts.block or (self.shared_expert.fp8_input_block if self.shared_expert is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, self.gate(x))

    def forward_routed(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The block given its router's logits for x (the decoder layer may compute them with its norm)."""
        topk_weights, topk_ids = kernels.select_experts(router_logits, self.top_k, self.renormalize,
                                                        shared_gate=self.fuse_shared)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out) if self.reduce_results else out
