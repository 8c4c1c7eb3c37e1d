"""Gated full attention: per-head [query | gate] from q_proj, q/k norm, partial rotary, sigmoid output gate."""

import torch
from torch import nn

from worker import kernels
from worker.config import ModelConfig
from worker.distributed import get_tp
from worker.kernels.fp8.quant import flatten_tokens
from worker.model.context import get_context
from worker.model.layers.linear import ColumnParallelLinear, MergedColumnLinear, RowParallelLinear, project_columns
from worker.model.layers.norm import RMSNorm
from worker.model.layers.rotary import PartialRotaryEmbedding


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, reduce_results: bool = True):
        super().__init__()
        tp = get_tp()
        self.head_dim = config.head_dim
        self.num_heads = tp.shard(config.num_attention_heads, "num_attention_heads")
        kv_replicas = 1
        if tp.size > config.num_key_value_heads:
            if tp.size % config.num_key_value_heads:
                raise ValueError(f"tensor parallel size {tp.size} must be a multiple of "
                                 f"num_key_value_heads ({config.num_key_value_heads})")
            kv_replicas = tp.size // config.num_key_value_heads
        self.num_kv_heads = max(1, config.num_key_value_heads // tp.size)
        self.scale = self.head_dim**-0.5
        hidden, bias, quant = config.hidden_size, config.attention_bias, config.quantization
        q_width, kv_width = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(hidden, 2 * q_width, bias, quant_config=quant, prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(hidden, kv_width, bias, kv_replicas, quant, prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(hidden, kv_width, bias, kv_replicas, quant, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(q_width, hidden, bias, reduce_results, quant, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = PartialRotaryEmbedding(
            self.head_dim, config.rotary_dim, config.rope_theta, config.max_position_embeddings
        )
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, H_kv, D], bound by the runner
        self.fp8_input_block = self.q_proj.block  # norm.RMSNorm
        self.v_cache: torch.Tensor | None = None
        self.qkv: MergedColumnLinear | None = None  # q, k and v as one GEMM, once loaded

    def after_loading(self) -> None:
        if self.qkv is None:
            self.qkv = MergedColumnLinear.of([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, H], or with `output_rows` [R] the rows [R, H]: every row's K and V still go into the cache;
        with the step context's `output_attn` only those rows' queries attend (else all do, then are picked)."""
        ctx = get_context()
        meta = ctx.attn
        tokens = hidden_states.shape[0]
        query_gate, key, value = project_columns(self.qkv, [self.q_proj, self.k_proj, self.v_proj], hidden_states)
        query, gate = query_gate.view(tokens, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        key = key.view(tokens, self.num_kv_heads, self.head_dim)
        value = value.view(tokens, self.num_kv_heads, self.head_dim)
        query = kernels.qk_norm_rope_and_cache(
            query, key, value, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.rotary.cos_sin, positions,
            self.k_cache, self.v_cache, meta.slot_mapping,
        )
        if output_rows is not None and ctx.output_attn is not None:
            query, gate, meta, tokens = query[output_rows], gate[output_rows], ctx.output_attn, output_rows.shape[0]
            output_rows = None
        out = kernels.paged_attention(
            query, self.k_cache, self.v_cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, self.scale,
            meta.max_context_len, output_gate=gate,  # gate read in place: no copy of the strided half
            quant_block=self.o_proj.block,  # with the keys split, the FP8 o projection's input groups come too
        )
        out = flatten_tokens(out)
        return self.o_proj(out if output_rows is None else out[output_rows])
