"""Loading FP8 checkpoints in the published Qwen3-Next-80B-A3B-Instruct-FP8 layout: which modules are
FP8 and which stay bf16, the weights and scales as stored, and every inconsistency named.

The tiny presets are narrower than a 128 block, so every block here is partial; tiny-dense-mix fuses
its shared expert (48 wide, padded to one 128 block per projection) and has dense MLP layers.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import read_checkpoint
from worker.config import ConfigError, ModelConfig
from worker.kernels.fp8.quant import FP8_DTYPE, scale_shape
from worker.model.layers.linear import Fp8AndDenseColumns
from worker.model.loader import CheckpointError, load_model
from worker.tools.tiny_fp8 import published_modules_to_not_convert

# What the issue lists as staying bf16, written independently of the tool's list: these parameter
# names must load unquantised, everything else that is a weight must load in FP8.
BF16_KEPT = re.compile(
    r"(^model\.embed_tokens\.weight$|^lm_head\.weight$|^mtp\.fc\.weight$"
    r"|\.linear_attn\.(in_proj_ba\.weight|conv1d\.weight|A_log|dt_bias|norm\.weight)$"
    r"|\.mlp\.gate\.weight$|\.mlp\.shared_expert_gate\.weight$|norm\.weight$|layernorm\.weight$"
    r"|\.pre_fc_norm_(embedding|hidden)\.weight$)")


@pytest.fixture(scope="module", params=["tiny", "tiny-dense-mix"])
def fp8_checkpoint(request, checkpoint_factory):
    return checkpoint_factory(request.param, dtype="bfloat16", fp8_block_size=128)


@pytest.fixture
def fp8_copy(checkpoint_factory, tmp_path):
    """A private copy of the tiny FP8 checkpoint to break."""
    return Path(shutil.copytree(checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=128), tmp_path / "ckpt"))


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


def rewrite(model_dir: Path, name: str, tensor: torch.Tensor | None) -> None:
    """Replace (or, with None, drop from its shard and the index) one stored tensor."""
    files = weight_map(model_dir)
    shard = model_dir / files.get(name, sorted(set(files.values()))[0])
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name]
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = tensor
        if name not in files:
            index = json.loads((model_dir / "model.safetensors.index.json").read_text())
            index["weight_map"][name] = shard.name
            (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, shard, metadata={"format": "pt"})


def fp8_parameters(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.dtype == FP8_DTYPE}


# ---------------------------------------------------------------- what is FP8, what stays bf16

def test_bf16_kept_modules_are_bf16_and_the_rest_fp8(fp8_checkpoint):
    model = load_model(fp8_checkpoint, torch.bfloat16)
    assert model.mtp is not None
    for name, param in model.named_parameters():
        if name.endswith("_scale_inv"):
            assert param.dtype == torch.float32, name
        elif BF16_KEPT.search(name):
            assert param.dtype == torch.bfloat16, f"{name} should stay bf16, is {param.dtype}"
            module = model.get_submodule(name.rsplit(".", 1)[0])
            assert getattr(module, "weight_scale_inv", None) is None, f"{name} has a block scale"
        else:
            assert param.dtype == FP8_DTYPE, f"{name} should be FP8, is {param.dtype}"
    # The drafter runs in the checkpoint's own quantisation: its attention and experts are FP8 too.
    mtp_layer = model.mtp.layers[0]
    assert mtp_layer.self_attn.q_proj.weight.dtype == mtp_layer.mlp.experts.w13.dtype == FP8_DTYPE
    assert model.mtp.fc.weight.dtype == torch.bfloat16
    # in_proj_ba stays bf16 while in_proj_qkvz is FP8: not one GEMM, one launch of two kinds.
    assert all(isinstance(layer.projections, Fp8AndDenseColumns) for layer in model.gdn_layers())


def test_fp8_weights_and_scales_load_as_stored(fp8_checkpoint):
    stored = read_checkpoint(fp8_checkpoint)
    model = load_model(fp8_checkpoint, torch.bfloat16)
    params = dict(model.named_parameters())
    used = set()
    for name, tensor in stored.items():
        if tensor.dtype != FP8_DTYPE or name not in params:  # stacked experts (and a fused shared one): below
            continue
        used |= {name, f"{name}_scale_inv"}
        assert params[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
        scale = stored[f"{name}_scale_inv"]
        assert scale.shape == scale_shape(tuple(tensor.shape), 128), name
        assert params[f"{name}_scale_inv"].equal(scale), name
    assert used, "no dense FP8 weight was checked"
    config = model.config
    first_moe = next(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    for layer, prefix in [(model.model.layers[first_moe], f"model.layers.{first_moe}"),
                          (model.mtp.layers[0], "mtp.layers.0")]:
        experts, inter = layer.mlp.experts, config.moe_intermediate_size
        padded = experts.inter_padded
        assert padded == 128 and experts.w13.shape == (experts.w13.shape[0], 2 * padded, config.hidden_size)
        assert experts.w13_scale_inv.shape == (experts.w13.shape[0], 2, 1)
        assert experts.w2_scale_inv.shape == (experts.w13.shape[0], 1, 1)
        ids = list(range(config.num_experts)) + (["shared"] if layer.mlp.fuse_shared else [])
        for index, expert in enumerate(ids):
            key = f"{prefix}.mlp.shared_expert" if expert == "shared" else f"{prefix}.mlp.experts.{expert}"
            gate, up, down = (stored[f"{key}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
            w13, w2 = experts.w13[index].view(torch.uint8), experts.w2[index].view(torch.uint8)
            assert w13[:inter].equal(gate.view(torch.uint8))
            assert w13[padded : padded + inter].equal(up.view(torch.uint8))
            assert w2[:, :inter].equal(down.view(torch.uint8))
            assert not w13[inter:padded].any() and not w13[padded + inter :].any() and not w2[:, inter:].any()
            assert experts.w13_scale_inv[index, 0].equal(stored[f"{key}.gate_proj.weight_scale_inv"][0])
            assert experts.w13_scale_inv[index, 1].equal(stored[f"{key}.up_proj.weight_scale_inv"][0])
            assert experts.w2_scale_inv[index].equal(stored[f"{key}.down_proj.weight_scale_inv"])


def test_modules_to_not_convert_is_followed_not_a_fixed_list(checkpoint_factory, tmp_path):
    from worker.tools.tiny_checkpoint import PRESETS, write_tiny_checkpoint

    extra = ["model.layers.1.linear_attn.out_proj", "mlp.shared_expert"]
    exempt = [m for m in published_modules_to_not_convert(PRESETS["tiny"]) if not m.endswith("in_proj_ba")] + extra
    path = write_tiny_checkpoint(tmp_path / "c", preset="tiny", quantize="fp8", modules_to_not_convert=exempt)
    model = load_model(path, torch.bfloat16)
    fp8 = fp8_parameters(model)
    assert "model.layers.1.linear_attn.out_proj.weight" not in fp8
    assert "model.layers.0.linear_attn.out_proj.weight" in fp8
    assert "model.layers.0.linear_attn.in_proj_ba.weight" in fp8, "in_proj_ba is FP8 once the list stops exempting it"
    assert not any(".shared_expert." in name for name in fp8) and "model.layers.0.mlp.experts.w13" in fp8


def test_short_names_exempt_the_same_modules_as_full_ones(fp8_checkpoint, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(fp8_checkpoint, short)
    config = json.loads((short / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = [
        "lm_head", "embed_tokens", "in_proj_ba", "mlp.gate", "shared_expert_gate", "mtp.fc", "norm", "conv1d"]
    (short / "config.json").write_text(json.dumps(config))
    assert fp8_parameters(load_model(short)) == fp8_parameters(load_model(fp8_checkpoint))


# ---------------------------------------------------------------- errors name the tensor

SCALES = ["model.layers.3.self_attn.q_proj.weight_scale_inv",
          "model.layers.0.mlp.experts.5.down_proj.weight_scale_inv",
          "model.layers.1.mlp.shared_expert.up_proj.weight_scale_inv",
          "mtp.layers.0.mlp.experts.2.gate_proj.weight_scale_inv"]


@pytest.mark.parametrize("name", SCALES, ids=["q_proj", "expert", "shared-expert", "mtp-expert"])
def test_missing_scale_is_named(fp8_copy, name):
    rewrite(fp8_copy, name, None)
    with pytest.raises(CheckpointError, match="missing weights") as err:
        load_model(fp8_copy)
    assert name in str(err.value)


@pytest.mark.parametrize("name", SCALES, ids=["q_proj", "expert", "shared-expert", "mtp-expert"])
def test_misshapen_scale_is_named_with_both_shapes(fp8_copy, name):
    good = read_checkpoint(fp8_copy)[name]
    bad = torch.ones(good.shape[0] + 1, good.shape[1])
    rewrite(fp8_copy, name, bad)
    with pytest.raises(CheckpointError) as err:
        load_model(fp8_copy)
    message = str(err.value)
    assert name in message and str(tuple(bad.shape)) in message and str(tuple(good.shape)) in message, message


def test_weight_stored_unquantised_where_the_config_says_fp8_is_refused(fp8_copy):
    name = "model.layers.0.linear_attn.out_proj.weight"
    rewrite(fp8_copy, name, read_checkpoint(fp8_copy)[name].float().bfloat16())
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*stored as bfloat16.*FP8"):
        load_model(fp8_copy)


def test_fp8_tensor_for_a_kept_module_is_refused(fp8_copy):
    name = "model.layers.0.linear_attn.in_proj_ba.weight"
    rewrite(fp8_copy, name, read_checkpoint(fp8_copy)[name].to(FP8_DTYPE))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*stored as float8_e4m3fn.*unquantised"):
        load_model(fp8_copy)


def test_scale_for_a_kept_module_is_refused(fp8_copy):
    name = "model.layers.0.linear_attn.in_proj_ba.weight_scale_inv"
    rewrite(fp8_copy, name, torch.ones(1, 1))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*not held in FP8"):
        load_model(fp8_copy)


def test_quantised_router_is_refused_by_name(checkpoint_factory, tmp_path):
    from worker.tools.tiny_checkpoint import PRESETS, write_tiny_checkpoint

    exempt = [m for m in published_modules_to_not_convert(PRESETS["tiny"]) if m != "model.layers.2.mlp.gate"]
    path = write_tiny_checkpoint(tmp_path / "c", preset="tiny", quantize="fp8", modules_to_not_convert=exempt)
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.mlp\.gate: .*FP8.*the router"):
        load_model(path)


def test_experts_partly_exempted_are_refused(fp8_copy, tmp_path):
    broken = fp8_copy
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.0.mlp.experts.3")
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts: .*all FP8 or none"):
        load_model(broken)


def test_config_records_the_quantisation(fp8_checkpoint):
    quant = ModelConfig.from_pretrained(fp8_checkpoint).quantization
    assert quant.weight_block_size == (128, 128) and quant.activation_scheme == "dynamic"
    assert "lm_head" in quant.modules_to_not_convert


def test_norms_before_fp8_layers_quantise_for_them(checkpoint_factory):
    """Each norm that feeds an FP8 layer is told its block (the GPU kernels then write the e4m3 groups the
    layer reads; tests/gpu/test_fp8_engine_gpu.py checks that this changes no bit); the unquantised
    model's norms are not, nor the final norms, which feed the bf16 lm_head."""
    for block in (128, None):
        model_dir = checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=block) if block else \
            checkpoint_factory("tiny", dtype="bfloat16")
        model = load_model(model_dir)
        layers = [*model.model.layers, *model.mtp.layers]
        for layer in layers:
            assert layer.input_layernorm.quant_block == block
            assert layer.post_attention_layernorm.quant_block == block
        gdn = [layer.linear_attn for layer in layers if layer.layer_type == "linear_attention"]
        assert gdn and all(m.norm.quant_block == block for m in gdn)
        assert model.model.norm.quant_block is None and model.mtp.norm.quant_block is None
