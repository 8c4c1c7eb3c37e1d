"""Model configuration read from an HF checkpoint folder's config.json.

Accepts both the transformers 4.x layout of the published Qwen3-Next files (top-level `rope_theta`,
`partial_rotary_factor`, `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: list[int]
    layer_types: list[str]
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    num_mtp_layers: int | None = None  # None: decided by the presence of mtp.* weights
    split_gdn_projections: bool = False  # Qwen3.5: in_proj_qkv / in_proj_z / in_proj_b / in_proj_a
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "linear_conv_kernel_dim",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "max_position_embeddings", "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"config.json: linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(self.layer_types)} entries, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"config.json: unknown layer_types {bad}; expected {LAYER_TYPES}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(
                f"config.json: partial_rotary_factor {self.partial_rotary_factor} with head_dim "
                f"{self.head_dim} gives rotary dim {self.rotary_dim}; it must be even and > 0"
            )
        if self.num_experts > 0 and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"1..num_experts ({self.num_experts})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gdn_group_ratio(self) -> int:
        """Value heads per key head (r = nv / nk)."""
        return self.linear_num_value_heads // self.linear_num_key_heads

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * self.linear_value_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def full_attention_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    def check_tensor_parallel(self, size: int) -> None:
        """Raise ConfigError naming what `size` ranks cannot split evenly."""
        splits = {
            "num_attention_heads": self.num_attention_heads,
            "linear_num_key_heads": self.linear_num_key_heads,
            "intermediate_size": self.intermediate_size,
        }
        if self.num_experts:
            splits["moe_intermediate_size"] = self.moe_intermediate_size
            splits["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        for name, value in splits.items():
            if value % size:
                raise ConfigError(f"tensor parallel size {size} does not divide {name} ({value})")
        kv = self.num_key_value_heads
        if (kv % size if size <= kv else size % kv):
            raise ConfigError(f"tensor parallel size {size} and num_key_value_heads ({kv}) must divide one another")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        raw = dict(raw.get("text_config", raw)) if raw.get("model_type") in ("qwen3_5", "qwen3_5_moe") else dict(raw)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
        num_layers = _required(raw, "num_hidden_layers")
        layer_types = raw.get("layer_types")
        if layer_types is None:
            interval = raw.get("full_attention_interval", 4)
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
            ]
        num_mtp = raw.get("num_nextn_predict_layers", raw.get("mtp_num_hidden_layers"))
        eos = raw.get("eos_token_id")
        num_experts = raw.get("num_experts", 0) or 0
        return cls(
            model_type=model_type,
            vocab_size=_required(raw, "vocab_size"),
            hidden_size=_required(raw, "hidden_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=_required(raw, "num_attention_heads"),
            num_key_value_heads=_required(raw, "num_key_value_heads"),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            intermediate_size=raw.get("intermediate_size", 0),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            linear_conv_kernel_dim=raw.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=_required(raw, "linear_key_head_dim"),
            linear_value_head_dim=_required(raw, "linear_value_head_dim"),
            linear_num_key_heads=_required(raw, "linear_num_key_heads"),
            linear_num_value_heads=_required(raw, "linear_num_value_heads"),
            num_experts=num_experts,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0),
            moe_intermediate_size=raw.get("moe_intermediate_size", 0),
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0),
            norm_topk_prob=raw.get("norm_topk_prob", True),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
            layer_types=list(layer_types),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            hidden_act=raw.get("hidden_act", "silu"),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            num_mtp_layers=num_mtp,
            split_gdn_projections=model_type.startswith("qwen3_5"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json in the model folder")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config.json: {e}") from e
        config = cls.from_dict(raw)
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if eos is not None:
                config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        return config


def _required(raw: dict, key: str):
    if key not in raw:
        raise ConfigError(f"config.json: missing required field {key!r}")
    return raw[key]
