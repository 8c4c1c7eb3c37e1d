"""FP8 tiny checkpoints in the layout of Qwen/Qwen3-Next-80B-A3B-Instruct-FP8.

Every linear weight [N, K] is stored as float8_e4m3fn with a float32 `<name>_scale_inv`
([ceil(N/b), ceil(K/b)], one scale per b x b block), except the modules that
`quantization_config.modules_to_not_convert` lists, which stay in the checkpoint dtype with every
other tensor (embeddings, norms, conv, A_log, dt_bias). The default list is the release's: full
module names, per layer. Weights are quantised from their float32 draws with exact or correctly
rounded arithmetic, so the bytes are the same on every machine, like the unquantised ones.
"""

from __future__ import annotations

import torch

from worker.config import Fp8Config
from worker.kernels.fp8.quant import quantize_block_fp8
from worker.tools.tiny_weights import is_moe_layer, layer_types


def _layer_exemptions(prefix: str, config: dict, layer_type: str, moe: bool) -> list[str]:
    names = [f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm"]
    if layer_type == "linear_attention":
        names += [f"{prefix}.linear_attn.{m}" for m in ("A_log", "conv1d", "dt_bias", "in_proj_ba", "norm")]
    else:
        names += [f"{prefix}.self_attn.q_norm", f"{prefix}.self_attn.k_norm"]
    if moe:
        names += [f"{prefix}.mlp.gate", f"{prefix}.mlp.shared_expert_gate"]
    return names


def published_modules_to_not_convert(config: dict, mtp: bool = True) -> list[str]:
    """The modules the FP8 release keeps in bf16, named as it names them, sorted."""
    names = ["lm_head", "model.embed_tokens", "model.norm"]
    for i, layer_type in enumerate(layer_types(config)):
        names += _layer_exemptions(f"model.layers.{i}", config, layer_type, is_moe_layer(config, i))
    if mtp:
        names += ["mtp.fc", "mtp.norm", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden"]
        names += _layer_exemptions("mtp.layers.0", config, "full_attention", config["num_experts"] > 0)
    return sorted(names)


def fp8_config(config: dict, block: int = 128, mtp: bool = True,
               modules_to_not_convert: list[str] | None = None) -> Fp8Config:
    exempt = published_modules_to_not_convert(config, mtp) if modules_to_not_convert is None else modules_to_not_convert
    return Fp8Config(weight_block_size=(block, block), modules_to_not_convert=tuple(exempt))


def _is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    # The release quantises nn.Linear layers only: 2-D weights, the embedding table aside.
    return name.endswith(".weight") and tensor.dim() == 2 and not name.endswith("embed_tokens.weight")


def quantize_tensors(tensors: dict[str, torch.Tensor], fp8: Fp8Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float32 tensors -> the FP8 checkpoint's: quantised weights each followed by its scale, the rest in dtype."""
    out = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if _is_linear_weight(name, tensor) and fp8.is_quantized(module):
            out[name], out[f"{name}_scale_inv"] = quantize_block_fp8(tensor, fp8.block)
        else:
            out[name] = tensor.to(dtype)
    return out
