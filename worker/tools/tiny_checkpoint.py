"""Write a small random Qwen3-Next checkpoint in the published Hugging Face layout.

The files mirror Qwen/Qwen3-Next-80B-A3B-*: a transformers-4.x style config.json,
generation_config.json, sharded safetensors with per-expert MoE weights plus an
index, mtp.* weights for multi-token prediction, and a byte-level BPE tokenizer
with ChatML special tokens (trained on corpus.txt, which ships next to this file).
The weights (worker/tools/tiny_weights.py) are the same bytes on every machine. With
`--quantize fp8` the linear weights are block-scaled FP8, as in Qwen3-Next-80B-A3B-Instruct-FP8
(worker/tools/tiny_fp8.py); the tiny presets are narrower than a 128 block, so their blocks are
partial (`--fp8-block-size` picks smaller ones).

    python -m worker.tools.tiny_checkpoint OUT_DIR [--preset tiny] [--seed 0] [--quantize fp8]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.tools.builtin_model import publish_atomically
from worker.tools.tiny_fp8 import fp8_config, quantize_tensors
from worker.tools.tiny_tokenizer import ENDOFTEXT, IM_END, write_json, write_tokenizer
from worker.tools.tiny_weights import (
    is_moe_layer,
    layer_types,
    materialize,
    tensor_specs,
)

# layer_types and is_moe_layer are re-exported: callers read presets through this module.
__all__ = ["PRESETS", "TINY_MODEL_NAME", "is_moe_layer", "layer_types", "published_config", "tiny_model_dir",
           "write_tiny_checkpoint"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("fp8",)

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
    # The parity and serving tests' model: layers 0-2 linear attention, layer 3 full attention, all MoE.
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

# ---------------------------------------------------------------- config

def build_config(preset: str, dtype: str, token_ids: dict[str, int]) -> dict:
    return published_config(PRESETS[preset], dtype, token_ids)


def published_config(architecture: dict, dtype: str, token_ids: dict[str, int]) -> dict:
    """config.json as the published checkpoints write it: their constant fields, `architecture`, token ids."""
    config = {**_PUBLISHED_CONSTANTS, **architecture}
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


# ---------------------------------------------------------------- files

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
    quantize: str | None = None,
    fp8_block_size: int = 128,
    modules_to_not_convert: list[str] | None = None,
) -> Path:
    """quantize "fp8": block-scaled FP8 linear weights (blocks of fp8_block_size), all else in dtype;
    modules_to_not_convert defaults to the release's list."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if shards < 1:
        raise ValueError("shards must be at least 1")
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {QUANTIZATIONS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    token_ids = write_tokenizer(out_dir, PRESETS[preset])
    config = build_config(preset, dtype, token_ids)
    specs = tensor_specs(config, mtp)
    if quantize == "fp8":
        fp8 = fp8_config(config, fp8_block_size, mtp, modules_to_not_convert)
        config["quantization_config"] = fp8.to_dict()
        tensors = quantize_tensors(materialize(specs, seed, torch.float32), fp8, DTYPES[dtype])
    else:
        tensors = materialize(specs, seed, DTYPES[dtype])
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", build_generation_config(token_ids))
    write_safetensors(out_dir, tensors, shards)
    return out_dir


# The version names the weights' bytes: v1 came from torch.randn and differed by CPU, v2 is portable.
# A cache holding an older version is left alone, never used.
TINY_MODEL_NAME = "tiny-random-v2"


def tiny_model_dir() -> Path:
    """The random `tiny` preset (what the serving and deployment tests run), written once into the cache."""
    return publish_atomically(TINY_MODEL_NAME, lambda staging: write_tiny_checkpoint(staging, preset="tiny"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--no-mtp", dest="mtp", action="store_false", help="omit the mtp.* weights")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="fp8: block-scaled FP8 linear weights in the Qwen3-Next-80B-A3B-Instruct-FP8 layout")
    parser.add_argument("--fp8-block-size", type=int, default=128, help="side of the square FP8 weight blocks")
    args = parser.parse_args(argv)
    out_dir = write_tiny_checkpoint(args.out_dir, args.preset, args.seed, args.shards, args.dtype, args.mtp,
                                    args.quantize, args.fp8_block_size)
    print(out_dir)


if __name__ == "__main__":
    main()
