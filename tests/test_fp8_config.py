"""The quantization_config of FP8 checkpoints: parsed as published, unsupported values refused by
name, and modules_to_not_convert matched by whole dotted names."""

import pytest

from worker.config import ConfigError, Fp8Config, ModelConfig
from worker.tools.model_shapes import shape_config

PUBLISHED = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
             "modules_to_not_convert": ["lm_head", "model.embed_tokens", "model.layers.0.linear_attn.in_proj_ba",
                                        "model.layers.0.mlp.gate", "model.layers.1.mlp.shared_expert_gate", "mtp.fc"]}


def test_published_quantization_config_parses():
    config = ModelConfig.from_dict({**shape_config("qwen3-next-80b"), "quantization_config": PUBLISHED})
    quant = config.quantization
    exempt = tuple(PUBLISHED["modules_to_not_convert"])
    assert quant == Fp8Config(weight_block_size=(128, 128), modules_to_not_convert=exempt)
    assert quant.block == 128 and Fp8Config.from_dict(quant.to_dict()) == quant
    assert ModelConfig.from_dict(shape_config("qwen3-next-80b")).quantization is None


@pytest.mark.parametrize("field,value,message", [
    ("quant_method", "awq", "quant_method 'awq' is not supported"),
    ("fmt", "e5m2", "fmt 'e5m2' is not supported"),
    ("activation_scheme", "static", "activation_scheme 'static' is not supported"),
    ("weight_block_size", None, "weight_block_size must be two positive integers"),
    ("weight_block_size", [128], "weight_block_size must be two positive integers"),
    ("weight_block_size", [128, 0], "weight_block_size must be two positive integers"),
    ("weight_block_size", [128, 64], "not square"),
    ("modules_to_not_convert", ["lm_head", 3], "modules_to_not_convert must be a list of module names"),
], ids=lambda v: str(v))
def test_unsupported_values_are_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**shape_config("qwen3-next-80b"), "quantization_config": {**PUBLISHED, field: value}})


@pytest.mark.parametrize("module,quantized", [
    ("lm_head", False),
    ("model.embed_tokens", False),
    ("model.layers.0.mlp.gate", False),
    ("model.layers.0.mlp.gate_proj", True),  # a different module, though "mlp.gate" is a prefix of its name
    ("model.layers.10.mlp.gate", True),  # "model.layers.1" must not match layer 10
    ("model.layers.0.linear_attn.in_proj_ba", False),
    ("model.layers.0.linear_attn.in_proj_qkvz", True),
    ("model.layers.1.mlp.shared_expert_gate", False),
    ("model.layers.1.mlp.shared_expert.gate_proj", True),
    ("mtp.fc", False),
    ("mtp.layers.0.self_attn.q_proj", True),
])
def test_full_names_match_whole_modules(module, quantized):
    assert Fp8Config.from_dict(PUBLISHED).is_quantized(module) is quantized


def test_short_names_and_parents_match_every_module_below():
    quant = Fp8Config(modules_to_not_convert=("mlp.shared_expert", "model.layers.1", "in_proj_ba"))
    assert not quant.is_quantized("model.layers.0.mlp.shared_expert.down_proj")
    assert quant.is_quantized("model.layers.0.mlp.shared_expert_gate")
    assert not quant.is_quantized("model.layers.1.self_attn.o_proj")
    assert quant.is_quantized("model.layers.11.self_attn.o_proj")
    assert not quant.is_quantized("mtp.layers.0.linear_attn.in_proj_ba")
