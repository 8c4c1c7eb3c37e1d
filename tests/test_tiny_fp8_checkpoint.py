"""The tiny tool's FP8 checkpoints (`--quantize fp8`): the published Qwen3-Next-80B-A3B-Instruct-FP8
layout, values quantised from the unquantised checkpoint's own draws, pinned bytes."""

import json

import torch

from tests.test_tiny_checkpoint import file_hashes, stored_tensors
from worker.kernels.fp8.quant import FP8_DTYPE, dequantize_block_fp8
from worker.tools import tiny_checkpoint as tc
from worker.tools.tiny_checkpoint import write_tiny_checkpoint

# sha256 of `write_tiny_checkpoint(dir, quantize="fp8")` (preset tiny, seed 0, 3 shards, bfloat16, with MTP,
# 128 blocks). Its tests/test_portable_checkpoint.py twin checks the bytes under every CPU path.
PINNED_TINY_FP8_WEIGHTS = {
    "model-00001-of-00003.safetensors": "4d8c5c2c740a02d81735519fe247e412c90531557fb1a27250cffb951c8e2a98",
    "model-00002-of-00003.safetensors": "960072c20647f92e09ef2a7ffd26c4d64b5bb0d4504ecada5bf68bf506f4e11e",
    "model-00003-of-00003.safetensors": "6a9ad021f88bc7f8ac00a49c73ddf5868c31cb338dc9cacc9dc018123361f04e",
}


def test_published_layout_names_dtypes_and_scale_shapes(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "c", quantize="fp8")
    config = json.loads((path / "config.json").read_text())
    quant = config["quantization_config"]
    assert {k: quant[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert config["torch_dtype"] == "bfloat16"
    assert {"lm_head", "model.embed_tokens", "model.layers.0.linear_attn.in_proj_ba", "model.layers.0.mlp.gate",
            "model.layers.0.mlp.shared_expert_gate", "mtp.fc"} <= set(quant["modules_to_not_convert"])
    tensors = stored_tensors(path)
    fp8 = {name for name, t in tensors.items() if t.dtype == FP8_DTYPE}
    scales = {name for name in tensors if name.endswith("_scale_inv")}
    assert {f"{name}_scale_inv" for name in fp8} == scales
    for name in fp8:
        rows, cols = tensors[name].shape
        assert tensors[f"{name}_scale_inv"].shape == (-(-rows // 128), -(-cols // 128)), name
        assert tensors[f"{name}_scale_inv"].dtype == torch.float32
    # The examples, at tiny sizes: in_proj_qkvz [512, 64] -> [4, 1]; an expert's down_proj [64, 32] -> [1, 1].
    assert tensors["model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"].shape == (4, 1)
    assert tensors["model.layers.0.mlp.experts.7.down_proj.weight_scale_inv"].shape == (1, 1)
    assert "mtp.layers.0.self_attn.o_proj.weight" in fp8 and "mtp.layers.0.mlp.experts.0.up_proj.weight" in fp8
    for kept in ("lm_head.weight", "mtp.fc.weight", "model.layers.0.linear_attn.in_proj_ba.weight",
                 "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.A_log", "model.norm.weight"):
        assert tensors[kept].dtype == torch.bfloat16, kept


def test_fp8_values_are_the_unquantised_draws_within_e4m3_rounding(tmp_path):
    fp8 = stored_tensors(write_tiny_checkpoint(tmp_path / "q", quantize="fp8"))
    plain = stored_tensors(write_tiny_checkpoint(tmp_path / "p", dtype="float32"))
    assert fp8.keys() - plain.keys() == {name for name in fp8 if name.endswith("_scale_inv")}
    for name, original in plain.items():
        if fp8[name].dtype == FP8_DTYPE:
            restored = dequantize_block_fp8(fp8[name], fp8[f"{name}_scale_inv"], 128)
            assert ((restored - original).abs() <= original.abs() * 2**-4 + 1e-6).all(), name
        else:
            assert torch.equal(fp8[name], original.bfloat16()), name


def test_fp8_bytes_are_pinned(tmp_path):
    hashes = file_hashes(write_tiny_checkpoint(tmp_path / "c", quantize="fp8"))
    assert {name: h for name, h in hashes.items() if name.endswith(".safetensors")} == PINNED_TINY_FP8_WEIGHTS


def test_cli_writes_fp8_with_the_block_size_asked(tmp_path):
    out = tmp_path / "cli"
    tc.main([str(out), "--preset", "tiny-tp", "--quantize", "fp8", "--fp8-block-size", "16", "--shards", "2"])
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["weight_block_size"] == [16, 16]
    tensors = stored_tensors(out)
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == FP8_DTYPE  # tiny-tp: layer 1 is attention
    assert tensors["model.layers.1.self_attn.q_proj.weight_scale_inv"].shape == (512 // 16, 128 // 16)
    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2
