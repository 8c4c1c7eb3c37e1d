"""Model configuration read from an HF checkpoint folder's config.json.

Accepts both the transformers 4.x layout of the published Qwen3-Next files (top-level `rope_theta`,
`partial_rotary_factor`, `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`), and the
`quantization_config` of the published FP8 checkpoints (Qwen3-Next-80B-A3B-*-FP8).
"""

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


@dataclass(frozen=True)
class Fp8Config:
    """Block-wise FP8 weights as Qwen and DeepSeek publish them: each linear weight [N, K] stored in
    float8_e4m3fn with a float32 `weight_scale_inv` [ceil(N/b), ceil(K/b)] (weight ~ fp8 * scale), and
    activations quantised per token and group of b input features at run time ("dynamic").

    `modules_to_not_convert` names the modules kept in the activation dtype: full names
    (`model.layers.0.mlp.gate`) or shorter dotted runs of one (`mlp.gate`, `lm_head`); an entry also
    covers the modules below it.
    """

    weight_block_size: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ()
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"

    def __post_init__(self):
        where = "config.json: quantization_config"
        if self.quant_method != "fp8":
            raise ConfigError(f"{where}.quant_method {self.quant_method!r} is not supported (only 'fp8')")
        if self.fmt != "e4m3":
            raise ConfigError(f"{where}.fmt {self.fmt!r} is not supported (only 'e4m3', float8_e4m3fn)")
        if self.activation_scheme != "dynamic":
            raise ConfigError(f"{where}.activation_scheme {self.activation_scheme!r} is not supported (only "
                              f"'dynamic': activation scales computed per token at run time)")
        block = self.weight_block_size
        if (not isinstance(block, tuple) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{where}.weight_block_size must be two positive integers [n, k], got {block!r} "
                              f"(per-tensor FP8 without blocks is not supported)")
        if block[0] != block[1]:
            raise ConfigError(f"{where}.weight_block_size {list(block)} is not square; only [b, b] blocks "
                              f"(the published [128, 128]) are supported")
        if not all(isinstance(m, str) and m for m in self.modules_to_not_convert):
            raise ConfigError(f"{where}.modules_to_not_convert must be a list of module names")

    @property
    def block(self) -> int:
        """The side of the square weight blocks, and the activation group size."""
        return self.weight_block_size[0]

    def is_quantized(self, module: str) -> bool:
        """Whether the checkpoint stores `module`'s weight in FP8 (it is not named in modules_to_not_convert)."""
        parts = module.split(".")
        runs = (".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))
        return self._exempt.isdisjoint(runs)

    @cached_property
    def _exempt(self) -> frozenset[str]:
        return frozenset(self.modules_to_not_convert)

    @classmethod
    def from_dict(cls, raw: dict) -> "Fp8Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json: quantization_config must be an object, got {raw!r}")
        block = raw.get("weight_block_size")
        return cls(
            weight_block_size=tuple(block) if isinstance(block, list) else block,
            modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
            quant_method=raw.get("quant_method", "fp8"),
            fmt=raw.get("fmt", "e4m3"),
            activation_scheme=raw.get("activation_scheme", "dynamic"),
        )

    def to_dict(self) -> dict:
        """The `quantization_config` of config.json, in the published key order."""
        return {"activation_scheme": self.activation_scheme, "fmt": self.fmt, "quant_method": self.quant_method,
                "weight_block_size": list(self.weight_block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}


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
    quantization: Fp8Config | None = None  # None: every weight in the activation dtype

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
            quantization=Fp8Config.from_dict(raw["quantization_config"]) if raw.get("quantization_config") else None,
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
