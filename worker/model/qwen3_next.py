"""Qwen3-Next for the engine: flat token batches in, caches owned by the caller.

`forward(input_ids [T], positions [T]) -> hidden_states [T, H]` after the final norm, with the step
metadata set by `worker.model.context.forward_context`. Parameter names follow the HF checkpoint,
except the stacked experts (`mlp.experts.w13` / `w2`) which the loader fills expert by expert. Every
layer is built with its checkpoint name as `prefix`, which decides (with `config.quantization`)
whether its weight is held in FP8.
"""

import functools
import os

import torch
from torch import nn

from worker import kernels
from worker.config import ModelConfig
from worker.distributed import get_tp
from worker.model.attention import GatedAttention
from worker.model.gdn import GatedDeltaNet
from worker.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.model.layers.fp8 import require_unquantized
from worker.model.layers.linear import ReplicatedLinear
from worker.model.layers.norm import AllReduceRMSNorm, RMSNorm
from worker.model.moe import DenseMLP, SparseMoeBlock


@functools.cache
def router_in_norm_launch() -> bool:
    """NEXTSERVE_ROUTER_NORM=1 (read once) multiplies the MoE router in the post-attention norm's launch; off
    until a GPU measures it against the norm and the router apart (profile_decode_step with each)."""
    return os.environ.get("NEXTSERVE_ROUTER_NORM", "0") == "1"


class DecoderLayer(nn.Module):
    """Token mixer and MLP, each before a norm. Their row-parallel projections (o_proj / out_proj,
    down_proj) leave the sum over tensor-parallel ranks to the norm after them, which reduces, adds the
    residual and normalises in one call (AllReduceRMSNorm)."""

    def __init__(self, config: ModelConfig, layer_type: str, use_moe: bool, prefix: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, f"{prefix}.linear_attn", reduce_results=False)
        else:
            self.self_attn = GatedAttention(config, f"{prefix}.self_attn", reduce_results=False)
        if use_moe:
            self.mlp = SparseMoeBlock(config, f"{prefix}.mlp", reduce_results=False)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, reduce_results=False,
                                quant_config=config.quantization, prefix=f"{prefix}.mlp")
        self.input_layernorm = AllReduceRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = AllReduceRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm.quant_block = self.token_mixer.fp8_input_block
        self.post_attention_layernorm.quant_block = self.mlp.fp8_input_block
        # The MoE's router multiplies in the norm's launch (kernels.fused_add_rms_norm_linear); with several
        # ranks the norm first sums the sublayer's output over them, so it stays a call of its own.
        self.router_after_norm = use_moe and get_tp().size == 1 and router_in_norm_launch()

    @property
    def token_mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                output_rows: torch.Tensor | None = None):
        """-> (this layer's MLP output, a per-rank partial sum; the residual stream before it): the next
        norm reduces the first and adds the two. With `output_rows` [R], only those rows come out: the token
        mixer still runs on every row (it writes their caches; attention attends those rows only where the
        step context has their `output_attn`), the MLP on those rows alone."""
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if output_rows is None:
            mixed = self.token_mixer(positions, hidden_states)
        elif self.layer_type == "linear_attention":
            mixed, residual = self.linear_attn(positions, hidden_states)[output_rows], residual[output_rows]
        else:
            mixed, residual = self.self_attn(positions, hidden_states, output_rows), residual[output_rows]
        if self.router_after_norm:
            norm = self.post_attention_layernorm
            router_logits, hidden_states, residual = kernels.fused_add_rms_norm_linear(
                mixed, residual, norm.weight, norm.eps, self.mlp.gate.weight, norm.quant_block)
            return self.mlp.forward_routed(hidden_states, router_logits), residual
        hidden_states, residual = self.post_attention_layernorm(mixed, residual)
        return self.mlp(hidden_states), residual


class Qwen3NextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        require_unquantized(config.quantization, "model.embed_tokens", "the embedding")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, config.layer_types[i], config.is_moe_layer(i), f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = AllReduceRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class MultiTokenPredictor(nn.Module):
    """The MTP head: row i reads the embedding of token i+1 and the target's post-norm hidden state
    at i, runs one full-attention decoder layer at position i, and predicts token i+2 through the
    shared lm_head. Its post-norm output feeds the next draft step when chaining."""

    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        hidden = config.hidden_size
        self.fc = ReplicatedLinear(2 * hidden, hidden, quant_config=config.quantization, prefix="mtp.fc")
        self.pre_fc_norm_embedding = RMSNorm(hidden, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(hidden, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, "full_attention", config.num_experts > 0, f"mtp.layers.{i}") for i in range(num_layers)
        )
        self.norm = AllReduceRMSNorm(hidden, config.rms_norm_eps)

    def forward(self, input_embeds: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                step: int = 0, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, H], or [R, H] for the rows `output_rows` (every row still writes its KV cache)."""
        x = torch.cat([self.pre_fc_norm_embedding(input_embeds), self.pre_fc_norm_hidden(hidden_states)], dim=-1)
        x, residual = self.layers[step % len(self.layers)](positions, self.fc(x), None, output_rows)
        return self.norm(x, residual)[0]


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, num_mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        require_unquantized(config.quantization, "lm_head", "the lm_head")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MultiTokenPredictor(config, num_mtp_layers) if num_mtp_layers else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def forward_mtp(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                    step: int = 0, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> the MTP's post-norm hidden states (of `output_rows` only, if given); `compute_logits` turns them
        into draft logits."""
        return self.mtp(self.model.embed_tokens(input_ids), positions, hidden_states, step, output_rows)

    def attention_layers(self) -> list[GatedAttention]:
        """Every full-attention layer that needs a KV cache, the MTP's last."""
        layers = [layer.self_attn for layer in self.model.layers if layer.layer_type == "full_attention"]
        if self.mtp is not None:
            layers += [layer.self_attn for layer in self.mtp.layers]
        return layers

    def gdn_layers(self) -> list[GatedDeltaNet]:
        return [layer.linear_attn for layer in self.model.layers if layer.layer_type == "linear_attention"]
