"""Every tensor of a tiny checkpoint: its name, shape and how its values are drawn.

The values are the same bytes on every machine. torch.randn takes a different vectorised path per
instruction set (AVX2 and AVX-512 give different weights for one seed), and numpy's distributions
may change between releases and call libm, whose exp/log differ by CPU (glibc picks FMA variants at
run time). So values come from the raw 64-bit stream of numpy's PCG64, which NEP 19 keeps stable,
turned into numbers by integer shifts, exact power-of-two scalings and IEEE float64 additions in a
fixed order only. Each tensor is drawn in float64, rounded once to float32 and then cast to the
checkpoint dtype, a round-to-nearest-even conversion on every CPU path.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Scale of every projection relative to 1/sqrt(fan_in): large enough that each sublayer
# visibly moves the residual stream, so a bug in any layer changes the logits.
PROJECTION_GAIN = 1.0
# Spread of the final logits: top-1/top-2 gaps average ~0.8, so greedy near-ties are rare.
TARGET_LOGIT_STD = 3.0
# Uniforms summed per normal draw (Irwin-Hall): mean n/2, variance n/12, so 12 give unit variance.
_UNIFORMS_PER_NORMAL = 12


class PortableRandom:
    """Uniform, normal and permutation draws that depend only on the seed, never on the machine."""

    def __init__(self, seed: int):
        self._bits = np.random.PCG64(seed)

    def uniform(self, count: int) -> np.ndarray:
        """[count] float64 in [0, 1): the top 53 bits of each raw draw, scaled exactly."""
        return (self._bits.random_raw(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, count: int) -> np.ndarray:
        """[count] float64 with mean 0 and variance 1 (Irwin-Hall: 12 uniforms summed, minus 6;
        bounded by +-6, which test weights never miss)."""
        u = self.uniform(count * _UNIFORMS_PER_NORMAL).reshape(count, _UNIFORMS_PER_NORMAL)
        total = u[:, 0].copy()
        for j in range(1, _UNIFORMS_PER_NORMAL):  # column by column: a fixed order of additions
            total += u[:, j]
        return total - _UNIFORMS_PER_NORMAL / 2

    def permutation(self, count: int) -> np.ndarray:
        """A random order of 0..count-1: raw draws as sort keys (a stable sort, so equal keys keep
        their index order)."""
        return np.argsort(self._bits.random_raw(count), kind="stable")


Init = Callable[[tuple[int, ...], PortableRandom], np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Init  # (shape, rng) -> float64 values of that shape


def normal(std: float, mean: float = 0.0) -> Init:
    return lambda shape, rng: (rng.normal(math.prod(shape)) * std + mean).reshape(shape)


def distinct_uniform(low: float, high: float) -> Init:
    """Uniform in [low, high), one draw from the middle of each of numel equal slices, shuffled.

    Plain random draws for a 2-head vector can round to the same bfloat16 value; a
    per-head parameter must differ between heads so that head-indexing bugs show.
    """

    def init(shape: tuple[int, ...], rng: PortableRandom) -> np.ndarray:
        count = math.prod(shape)
        slot = rng.permutation(count).astype(np.float64)
        within_slot = 0.1 + 0.8 * rng.uniform(count)
        return (low + (slot + within_slot) * (high - low) / count).reshape(shape)

    return init


def tensor_seed(seed: int, name: str) -> int:
    # Seeding each tensor from its own name keeps values stable when other tensors are
    # added or dropped (e.g. --no-mtp leaves the main model's weights unchanged).
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def materialize(specs: list[TensorSpec], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for spec in specs:
        values = spec.init(spec.shape, PortableRandom(tensor_seed(seed, spec.name)))
        assert values.shape == spec.shape and values.dtype == np.float64, spec.name
        tensors[spec.name] = torch.from_numpy(values.astype(np.float32)).to(dtype).contiguous()
    return tensors


# ---------------------------------------------------------------- the tensors of each layer

def layer_types(config: dict) -> list[str]:
    if config.get("layer_types"):
        return list(config["layer_types"])
    interval = config.get("full_attention_interval", 4)
    return [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention"
        for i in range(config["num_hidden_layers"])
    ]


def is_moe_layer(config: dict, layer_index: int) -> bool:
    return (
        layer_index not in config.get("mlp_only_layers", [])
        and config["num_experts"] > 0
        and (layer_index + 1) % config["decoder_sparse_step"] == 0
    )


def _linear(name: str, out_features: int, in_features: int, gain: float = PROJECTION_GAIN) -> TensorSpec:
    return TensorSpec(name, (out_features, in_features), normal(gain / math.sqrt(in_features)))


def _zero_centred_norm(name: str, dim: int) -> TensorSpec:
    # Qwen3-Next RMSNorm scales by (1 + weight); random offsets catch a missing "1 +".
    return TensorSpec(name, (dim,), normal(0.1))


def _full_attention(prefix: str, c: dict) -> list[TensorSpec]:
    hidden, head_dim = c["hidden_size"], c["head_dim"]
    q_width, kv_width = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return [
        # Twice the query width: each head's query is followed by its output gate.
        _linear(f"{prefix}.q_proj.weight", 2 * q_width, hidden),
        _linear(f"{prefix}.k_proj.weight", kv_width, hidden),
        _linear(f"{prefix}.v_proj.weight", kv_width, hidden),
        _linear(f"{prefix}.o_proj.weight", hidden, q_width),
        _zero_centred_norm(f"{prefix}.q_norm.weight", head_dim),
        _zero_centred_norm(f"{prefix}.k_norm.weight", head_dim),
    ]


def _linear_attention(prefix: str, c: dict) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    nk, nv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    values_per_key = nv // nk
    conv_channels = 2 * nk * dk + nv * dv
    return [
        _linear(f"{prefix}.in_proj_qkvz.weight", nk * (2 * dk + 2 * values_per_key * dv), hidden),
        _linear(f"{prefix}.in_proj_ba.weight", 2 * nv, hidden),
        TensorSpec(f"{prefix}.conv1d.weight", (conv_channels, 1, c["linear_conv_kernel_dim"]), normal(0.3)),
        # Mamba-style negative bias: softplus(dt_bias) in ~[0.05, 0.3], so with A in [1, 16]
        # the per-token decay exp(-A * softplus) spans ~0.01..0.95 and some heads remember
        # many tokens, which makes recurrent-state handling matter for the logits.
        TensorSpec(f"{prefix}.dt_bias", (nv,), distinct_uniform(-3.0, -1.0)),
        # A = exp(A_log) log-uniform in [1, 15.6]; drawn as the log itself, so no libm log is needed.
        TensorSpec(f"{prefix}.A_log", (nv,), distinct_uniform(0.0, 2.75)),
        # The gated norm multiplies by weight directly (no "1 +"), so centre it on one.
        TensorSpec(f"{prefix}.norm.weight", (dv,), normal(0.1, mean=1.0)),
        _linear(f"{prefix}.out_proj.weight", hidden, nv * dv),
    ]


def _dense_mlp(prefix: str, hidden: int, intermediate: int) -> list[TensorSpec]:
    return [
        _linear(f"{prefix}.gate_proj.weight", intermediate, hidden),
        _linear(f"{prefix}.up_proj.weight", intermediate, hidden),
        _linear(f"{prefix}.down_proj.weight", hidden, intermediate),
    ]


def _sparse_moe(prefix: str, c: dict) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    # Router logits with unit spread so top-k picks are decisive, not near-ties.
    specs = [_linear(f"{prefix}.gate.weight", c["num_experts"], hidden, gain=1.0)]
    for expert in range(c["num_experts"]):
        specs += _dense_mlp(f"{prefix}.experts.{expert}", hidden, c["moe_intermediate_size"])
    specs += _dense_mlp(f"{prefix}.shared_expert", hidden, c["shared_expert_intermediate_size"])
    specs.append(_linear(f"{prefix}.shared_expert_gate.weight", 1, hidden, gain=1.0))
    return specs


def _decoder_layer(prefix: str, c: dict, layer_type: str, moe: bool) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    if layer_type == "linear_attention":
        mixer = _linear_attention(f"{prefix}.linear_attn", c)
    elif layer_type == "full_attention":
        mixer = _full_attention(f"{prefix}.self_attn", c)
    else:
        raise ValueError(f"unknown layer type {layer_type!r}")
    mlp = _sparse_moe(f"{prefix}.mlp", c) if moe else _dense_mlp(f"{prefix}.mlp", hidden, c["intermediate_size"])
    return [
        _zero_centred_norm(f"{prefix}.input_layernorm.weight", hidden),
        *mixer,
        _zero_centred_norm(f"{prefix}.post_attention_layernorm.weight", hidden),
        *mlp,
    ]


def _mtp(c: dict) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    return [
        _linear("mtp.fc.weight", hidden, 2 * hidden),
        _zero_centred_norm("mtp.pre_fc_norm_embedding.weight", hidden),
        _zero_centred_norm("mtp.pre_fc_norm_hidden.weight", hidden),
        *_decoder_layer("mtp.layers.0", c, "full_attention", moe=c["num_experts"] > 0),
        _zero_centred_norm("mtp.norm.weight", hidden),
    ]


def tensor_specs(config: dict, mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in model order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), normal(1.0))]
    for i, layer_type in enumerate(layer_types(config)):
        specs += _decoder_layer(f"model.layers.{i}", config, layer_type, is_moe_layer(config, i))
    specs.append(_zero_centred_norm("model.norm.weight", hidden))
    specs.append(_linear("lm_head.weight", vocab, hidden, gain=TARGET_LOGIT_STD))
    if mtp:
        specs += _mtp(config)
    return specs
