"""Write a small random Qwen3-Next checkpoint in the published Hugging Face layout.

The files mirror Qwen/Qwen3-Next-80B-A3B-*: a transformers-4.x style config.json,
generation_config.json, sharded safetensors with per-expert MoE weights plus an
index, mtp.* weights for multi-token prediction, and a byte-level BPE tokenizer
with ChatML special tokens (trained on corpus.txt, which ships next to this file).

    python -m worker.tools.tiny_checkpoint OUT_DIR [--preset tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.tools.tiny_tokenizer import ENDOFTEXT, IM_END, write_json, write_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Fields every published Qwen3-Next config.json carries with these values.
_PUBLISHED_CONSTANTS = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "linear_conv_kernel_dim": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
}


def _preset(**architecture) -> dict:
    return {**_PUBLISHED_CONSTANTS, **architecture}


# config.json fields per preset; token ids and dtype are added when writing.
PRESETS: dict[str, dict] = {
    # The built-in model: layers 0-2 linear attention, layer 3 full attention, all MoE.
    "tiny": _preset(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.25,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=True,
    ),
    # Explicit non-periodic layer_types, dense and MoE layers mixed through both
    # decoder_sparse_step (MoE on odd layers) and mlp_only_layers (layer 1 forced dense).
    "tiny-dense-mix": _preset(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=5,
        layer_types=[
            "linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention",
        ],
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=48,
        partial_rotary_factor=0.5,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        decoder_sparse_step=2,
        mlp_only_layers=[1],
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    # Every head count and width divides by 2 and 4 so tensor-parallel splits are exact.
    "tiny-tp": _preset(
        vocab_size=768,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        full_attention_interval=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.25,
        rope_theta=10000000.0,
        max_position_embeddings=4096,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=True,
    ),
}

# Scale of every projection relative to 1/sqrt(fan_in): large enough that each sublayer
# visibly moves the residual stream, so a bug in any layer changes the logits.
PROJECTION_GAIN = 1.0
# Spread of the final logits: top-1/top-2 gaps average ~0.8, so greedy near-ties are rare.
TARGET_LOGIT_STD = 3.0


# ---------------------------------------------------------------- config

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


def build_config(preset: str, dtype: str, token_ids: dict[str, int]) -> dict:
    config = dict(PRESETS[preset])
    config["torch_dtype"] = dtype
    config["bos_token_id"] = token_ids[ENDOFTEXT]
    config["eos_token_id"] = token_ids[IM_END]
    config["transformers_version"] = "4.57.0.dev0"
    return config


def build_generation_config(token_ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": token_ids[ENDOFTEXT],
        "do_sample": False,
        "eos_token_id": [token_ids[IM_END], token_ids[ENDOFTEXT]],
        "pad_token_id": token_ids[ENDOFTEXT],
        "transformers_version": "4.57.0.dev0",
    }


# ---------------------------------------------------------------- weights

Init = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Init


def _normal(std: float, mean: float = 0.0) -> Init:
    return lambda shape, gen: torch.randn(shape, generator=gen) * std + mean


def _distinct_uniform(low: float, high: float) -> Init:
    """Uniform in [low, high), one draw from the middle of each of numel equal slices, shuffled.

    Plain random draws for a 2-head vector can round to the same bfloat16 value; a
    per-head parameter must differ between heads so that head-indexing bugs show.
    """

    def init(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        count = math.prod(shape)
        slot = torch.randperm(count, generator=gen).float()
        within_slot = 0.1 + 0.8 * torch.rand(count, generator=gen)
        return (low + (slot + within_slot) * (high - low) / count).reshape(shape)

    return init


def _log_of(init: Init) -> Init:
    return lambda shape, gen: init(shape, gen).log()


def _linear(name: str, out_features: int, in_features: int, gain: float = PROJECTION_GAIN) -> TensorSpec:
    return TensorSpec(name, (out_features, in_features), _normal(gain / math.sqrt(in_features)))


def _zero_centred_norm(name: str, dim: int) -> TensorSpec:
    # Qwen3-Next RMSNorm scales by (1 + weight); random offsets catch a missing "1 +".
    return TensorSpec(name, (dim,), _normal(0.1))


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
        TensorSpec(f"{prefix}.conv1d.weight", (conv_channels, 1, c["linear_conv_kernel_dim"]), _normal(0.3)),
        # Mamba-style negative bias: softplus(dt_bias) in ~[0.05, 0.3], so with A in [1, 16]
        # the per-token decay exp(-A * softplus) spans ~0.01..0.95 and some heads remember
        # many tokens, which makes recurrent-state handling matter for the logits.
        TensorSpec(f"{prefix}.dt_bias", (nv,), _distinct_uniform(-3.0, -1.0)),
        TensorSpec(f"{prefix}.A_log", (nv,), _log_of(_distinct_uniform(1.0, 16.0))),
        # The gated norm multiplies by weight directly (no "1 +"), so centre it on one.
        TensorSpec(f"{prefix}.norm.weight", (dv,), _normal(0.1, mean=1.0)),
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
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), _normal(1.0))]
    for i, layer_type in enumerate(layer_types(config)):
        specs += _decoder_layer(f"model.layers.{i}", config, layer_type, is_moe_layer(config, i))
    specs.append(_zero_centred_norm("model.norm.weight", hidden))
    specs.append(_linear("lm_head.weight", vocab, hidden, gain=TARGET_LOGIT_STD))
    if mtp:
        specs += _mtp(config)
    return specs


def _tensor_seed(seed: int, name: str) -> int:
    # Seeding each tensor from its own name keeps values stable when other tensors are
    # added or dropped (e.g. --no-mtp leaves the main model's weights unchanged).
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def materialize(specs: list[TensorSpec], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator()
    tensors = {}
    for spec in specs:
        generator.manual_seed(_tensor_seed(seed, spec.name))
        tensors[spec.name] = spec.init(spec.shape, generator).to(dtype).contiguous()
    return tensors


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def shard_file_name(index: int, shards: int) -> str:
    return f"model-{index + 1:05d}-of-{shards:05d}.safetensors"


def split_into_shards(tensors: dict[str, torch.Tensor], shards: int) -> list[list[str]]:
    """Contiguous runs of tensor names with roughly equal byte sizes."""
    total = sum(_tensor_bytes(t) for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    offset = 0
    for name, tensor in tensors.items():
        size = _tensor_bytes(tensor)
        groups[min(shards - 1, (offset + size // 2) * shards // total)].append(name)
        offset += size
    if not all(groups):
        raise ValueError(f"{len(tensors)} tensors cannot fill {shards} shards")
    return groups


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    weight_map = {}
    for index, names in enumerate(split_into_shards(tensors, shards)):
        file_name = shard_file_name(index, shards)
        save_file({name: tensors[name] for name in names}, out_dir / file_name, metadata={"format": "pt"})
        # safetensors creates files owner-only; a cached model may be read by another user.
        (out_dir / file_name).chmod(0o644)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {
        "metadata": {"total_size": sum(_tensor_bytes(t) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(out_dir / "model.safetensors.index.json", index)


# ---------------------------------------------------------------- entry points

def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    shards: int = 3,
    dtype: str = "bfloat16",
    mtp: bool = True,
) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if shards < 1:
        raise ValueError("shards must be at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    token_ids = write_tokenizer(out_dir, PRESETS[preset])
    config = build_config(preset, dtype, token_ids)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", build_generation_config(token_ids))
    write_safetensors(out_dir, materialize(tensor_specs(config, mtp), seed, DTYPES[dtype]), shards)
    return out_dir


BUILTIN_MODEL_NAME = "builtin-tiny-v1"


def builtin_model_dir() -> Path:
    """The `tiny` preset, written once into the cache and reused afterwards."""
    cache_root = Path(os.environ.get("NEXTSERVE_CACHE") or Path.home() / ".cache" / "nextserve")
    target = cache_root / BUILTIN_MODEL_NAME
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=cache_root))
    try:
        write_tiny_checkpoint(staging, preset="tiny")
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        # A rename is atomic, so readers never see a half-written checkpoint.
        os.rename(staging, target)
    except OSError:
        # Another process renamed its copy into place first; theirs is as good as ours.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--no-mtp", dest="mtp", action="store_false", help="omit the mtp.* weights")
    args = parser.parse_args(argv)
    out_dir = write_tiny_checkpoint(args.out_dir, args.preset, args.seed, args.shards, args.dtype, args.mtp)
    print(out_dir)


if __name__ == "__main__":
    main()
