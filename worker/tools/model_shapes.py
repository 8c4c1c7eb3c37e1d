"""Published model shapes, for benchmarks and GPU tests that need real layer sizes but no weights.

`write_shape_config(out_dir, "qwen3-next-80b", num_layers=4)` writes a config.json (and a
generation_config.json) that `load_format="dummy"` turns into a model with random weights on the
device: Qwen3-Next-80B-A3B's per-layer shapes with fewer layers (every 4th full attention).
`quantize="fp8"` adds the quantization_config of Qwen3-Next-80B-A3B-Instruct-FP8 (128 x 128 blocks,
the release's modules_to_not_convert), for FP8 benchmarks at full size.
"""

import json
from pathlib import Path

from worker.tools.tiny_checkpoint import _PUBLISHED_CONSTANTS
from worker.tools.tiny_fp8 import fp8_config

SHAPES = {
    "qwen3-next-80b": {
        **_PUBLISHED_CONSTANTS,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "num_hidden_layers": 48,
        "full_attention_interval": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "partial_rotary_factor": 0.25,
        "rope_theta": 10000000.0,
        "max_position_embeddings": 262144,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
}


def shape_config(name: str, num_layers: int | None = None, quantize: str | None = None) -> dict:
    config = dict(SHAPES[name])
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    if quantize == "fp8":
        config["quantization_config"] = fp8_config(config).to_dict()
    elif quantize is not None:
        raise ValueError(f"unknown quantization {quantize!r}; only 'fp8'")
    return config


def write_shape_config(out_dir: str | Path, name: str = "qwen3-next-80b", num_layers: int | None = None,
                       quantize: str | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = shape_config(name, num_layers, quantize)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"]],
                  "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
