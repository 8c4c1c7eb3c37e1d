"""Checkpoint loading and config parsing: the happy path bit-exact, and every error naming its culprit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tests.helpers import read_checkpoint
from worker.config import ConfigError, ModelConfig
from worker.engine.cache_tensors import CacheShapes, allocate_and_bind
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.model.context import forward_context
from worker.model.loader import CheckpointError, load_model


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def bf16_checkpoint(checkpoint_factory):
    return checkpoint_factory("tiny", dtype="bfloat16", shards=3)


@pytest.fixture
def checkpoint_copy(bf16_checkpoint, tmp_path):
    """A private copy of the bf16 tiny checkpoint to break."""
    return Path(shutil.copytree(bf16_checkpoint, tmp_path / "ckpt"))


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


def rewrite_shard(model_dir: Path, name: str, new_tensor: torch.Tensor | None) -> Path:
    """Rewrite the shard holding `name` with that tensor replaced (or dropped when None)."""
    shard = model_dir / weight_map(model_dir)[name]
    tensors = load_file(shard)
    if new_tensor is None:
        del tensors[name]
    else:
        tensors[name] = new_tensor
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=2))


def expected_parameters(model, checkpoint: dict[str, torch.Tensor]):
    """Each model parameter assembled independently from the checkpoint tensors as stored.
    -> ({parameter name: tensor}, the checkpoint names used)."""
    num_experts = model.config.num_experts
    expected, used = {}, set()

    def take(key):
        used.add(key)
        return checkpoint[key]

    for name, param in model.named_parameters():
        if name.endswith(".experts.w13"):
            prefix = name[: -len("w13")]
            expected[name] = torch.stack([
                torch.cat([take(f"{prefix}{e}.gate_proj.weight"), take(f"{prefix}{e}.up_proj.weight")])
                for e in range(num_experts)
            ])
        elif name.endswith(".experts.w2"):
            prefix = name[: -len("w2")]
            expected[name] = torch.stack([take(f"{prefix}{e}.down_proj.weight") for e in range(num_experts)])
        else:
            expected[name] = held_rows(model, name, take(name).reshape(param.shape))  # conv1d: [C, 1, K] -> [C, K]
    return expected, used


def held_rows(model, name: str, stored: torch.Tensor) -> torch.Tensor:
    """A stored tensor in the row order the loaded model holds it: the GDN's packed projections are
    reordered into [q | k | v | z] and [b | a] once loaded (GatedDeltaNet.after_loading)."""
    for suffix, order, planar in (("in_proj_qkvz.weight", "qkvz_order", "qkvz_planar"),
                                  ("in_proj_ba.weight", "ba_order", "ba_planar")):
        if name.endswith(suffix):
            gdn = model.get_submodule(name.removesuffix(f".{suffix}"))
            assert getattr(gdn, planar), f"{name}: a bf16 projection is always reordered"
            return stored.index_select(0, getattr(gdn, order))
    return stored


# ---------------------------------------------------------------- happy path

def test_sharded_bf16_checkpoint_loads_exactly(bf16_checkpoint):
    shards = set(weight_map(bf16_checkpoint).values())
    assert len(shards) >= 3, shards
    stored = read_checkpoint(bf16_checkpoint)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    fp32 = load_model(bf16_checkpoint, torch.float32)
    bf16 = load_model(bf16_checkpoint, torch.bfloat16)
    expected, used = expected_parameters(fp32, stored)
    assert used == set(stored), f"checkpoint tensors with no parameter: {sorted(set(stored) - used)}"
    fp32_params, bf16_params = dict(fp32.named_parameters()), dict(bf16.named_parameters())
    for name, want in expected.items():
        assert fp32_params[name].dtype == torch.float32 and bf16_params[name].dtype == torch.bfloat16, name
        assert torch.equal(fp32_params[name], want.float()), f"{name}: fp32 load is not the bf16 value cast"
        assert torch.equal(bf16_params[name], want), f"{name}: bf16 load differs from the stored tensor"


def test_input_projections_multiply_as_one_gemm_once_loaded(bf16_checkpoint):
    model = load_model(bf16_checkpoint, torch.bfloat16)
    assert all(layer.projections is not None for layer in model.gdn_layers())
    assert all(layer.qkv is not None for layer in model.attention_layers())


def test_mtp_detected_from_weights(checkpoint_factory):
    with_mtp = load_model(checkpoint_factory("tiny", dtype="bfloat16", mtp=True))
    without = load_model(checkpoint_factory("tiny", dtype="bfloat16", mtp=False))
    assert with_mtp.mtp is not None and len(with_mtp.mtp.layers) == 1
    assert without.mtp is None
    assert len(with_mtp.attention_layers()) == len(without.attention_layers()) + 1


@pytest.mark.parametrize("key", ["num_nextn_predict_layers", "mtp_num_hidden_layers"])
def test_mtp_layer_count_from_config(checkpoint_copy, key):
    """A config asking for 2 MTP layers loads mtp.layers.1.* (added here as an extra shard)."""
    stored = read_checkpoint(checkpoint_copy)
    extra = {k.replace("mtp.layers.0.", "mtp.layers.1."): v.clone() * 0.5
             for k, v in stored.items() if k.startswith("mtp.layers.0.")}
    save_file(extra, checkpoint_copy / "model-extra-mtp.safetensors", metadata={"format": "pt"})
    edit_json(checkpoint_copy / "model.safetensors.index.json",
              lambda raw: raw["weight_map"].update(dict.fromkeys(extra, "model-extra-mtp.safetensors")))
    edit_json(checkpoint_copy / "config.json", lambda raw: raw.update({key: 2}))
    assert ModelConfig.from_pretrained(checkpoint_copy).num_mtp_layers == 2
    model = load_model(checkpoint_copy)
    assert len(model.mtp.layers) == 2
    layer1 = model.mtp.layers[1]
    assert torch.equal(layer1.self_attn.q_proj.weight, extra["mtp.layers.1.self_attn.q_proj.weight"].float())
    assert torch.equal(layer1.mlp.experts.w2[5], extra["mtp.layers.1.mlp.experts.5.down_proj.weight"].float())


def test_mtp_layer_count_without_weights_names_missing_layer(checkpoint_copy):
    edit_json(checkpoint_copy / "config.json", lambda raw: raw.update({"num_nextn_predict_layers": 2}))
    with pytest.raises(CheckpointError, match=r"missing weights: .*mtp\.layers\.1\."):
        load_model(checkpoint_copy)


# ---------------------------------------------------------------- config layouts

def to_5x_layout(raw: dict) -> dict:
    """The transformers 5.x spelling of a 4.x config: rope_parameters and dtype."""
    raw = dict(raw)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
                              "partial_rotary_factor": raw.pop("partial_rotary_factor")}
    raw.pop("rope_scaling", None)
    raw["dtype"] = raw.pop("torch_dtype")
    return raw


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense-mix"])
def test_4x_and_5x_config_layouts_agree(checkpoint_factory, tmp_path, preset):
    src = checkpoint_factory(preset, dtype="float32")
    raw_4x = json.loads((src / "config.json").read_text())
    assert "rope_theta" in raw_4x and "partial_rotary_factor" in raw_4x and "torch_dtype" in raw_4x
    parsed_4x = ModelConfig.from_dict(raw_4x)
    assert ModelConfig.from_dict(to_5x_layout(raw_4x)) == parsed_4x
    # What transformers 5 itself writes when it saves the config.
    AutoConfig.from_pretrained(src).save_pretrained(tmp_path)
    raw_hf = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw_hf and "rope_theta" not in raw_hf
    assert ModelConfig.from_dict(raw_hf) == parsed_4x
    assert parsed_4x.partial_rotary_factor == raw_4x["partial_rotary_factor"]
    assert parsed_4x.rope_theta == raw_4x["rope_theta"]
    assert parsed_4x.torch_dtype == "float32"


def test_mtp_count_keys_parse(checkpoint_factory):
    raw = json.loads((checkpoint_factory("tiny") / "config.json").read_text())
    assert ModelConfig.from_dict(raw).num_mtp_layers is None
    assert ModelConfig.from_dict({**raw, "num_nextn_predict_layers": 1}).num_mtp_layers == 1
    assert ModelConfig.from_dict({**raw, "mtp_num_hidden_layers": 3}).num_mtp_layers == 3


# ---------------------------------------------------------------- errors: weights

def test_missing_weight_in_shard_is_named(checkpoint_copy):
    """Dropped from its shard but still listed in the index."""
    name = "model.layers.1.linear_attn.A_log"
    shard = rewrite_shard(checkpoint_copy, name, None)
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint_copy)
    assert name in str(err.value) and shard.name in str(err.value)


@pytest.mark.parametrize("name", ["model.layers.2.linear_attn.conv1d.weight",
                                  "model.layers.0.mlp.experts.6.up_proj.weight",
                                  "mtp.layers.0.self_attn.k_norm.weight"])
def test_missing_weight_everywhere_is_named(checkpoint_copy, name):
    """Dropped from its shard and from the index: the load must still notice the hole."""
    rewrite_shard(checkpoint_copy, name, None)
    edit_json(checkpoint_copy / "model.safetensors.index.json", lambda raw: raw["weight_map"].pop(name))
    with pytest.raises(CheckpointError, match="missing weights") as err:
        load_model(checkpoint_copy)
    assert name in str(err.value)
    if ".experts." in name:
        assert f"{name} (into {name.replace('.6.up_proj.weight', '.w13')})" in str(err.value)


def test_missing_shard_file_is_named(checkpoint_copy):
    (checkpoint_copy / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors"):
        load_model(checkpoint_copy)


# (tensor, bad shape); the tiny preset: hidden 64, 4 query heads x 32, 2 KV heads, GDN nk=2 nv=4
# dk=32 dv=48 (conv channels 320), 8 experts of 32, vocab 1024.
SHAPE_CASES = [
    pytest.param("model.norm.weight", (65,), id="final-norm"),
    pytest.param("model.layers.3.self_attn.q_proj.weight", (255, 64), id="q_proj-rows"),
    pytest.param("model.layers.3.self_attn.q_proj.weight", (256, 63), id="q_proj-cols"),
    pytest.param("model.layers.3.self_attn.q_proj.weight", (256, 64, 1), id="q_proj-rank3"),
    pytest.param("model.layers.3.self_attn.o_proj.weight", (64, 129), id="o_proj-cols"),
    pytest.param("model.embed_tokens.weight", (1024, 63), id="embed-hidden"),
    pytest.param("lm_head.weight", (1025, 64), id="lm_head-vocab"),
    pytest.param("model.layers.0.linear_attn.in_proj_ba.weight", (9, 64), id="in_proj_ba-rows"),
    pytest.param("model.layers.0.linear_attn.norm.weight", (47,), id="gdn-gated-norm"),
    pytest.param("model.layers.0.mlp.experts.3.up_proj.weight", (32, 65), id="expert-up-cols"),
    pytest.param("model.layers.0.mlp.shared_expert_gate.weight", (2, 64), id="shared-expert-gate"),
    pytest.param("mtp.fc.weight", (64, 127), id="mtp-fc"),
    pytest.param("model.layers.0.linear_attn.A_log", (4, 1), id="A_log-rank2"),
    pytest.param("model.layers.0.linear_attn.A_log", (5,), id="A_log-too-long"),
    pytest.param("model.layers.1.linear_attn.dt_bias", (6,), id="dt_bias-too-long"),
    pytest.param("model.layers.0.linear_attn.A_log", (3,), id="A_log-too-short"),
    pytest.param("model.layers.0.mlp.experts.3.gate_proj.weight", (33, 64), id="expert-gate-rows-long"),
    pytest.param("model.layers.0.mlp.experts.3.down_proj.weight", (64, 33), id="expert-down-cols-long"),
    pytest.param("model.layers.0.mlp.experts.3.gate_proj.weight", (31, 64), id="expert-gate-rows-short"),
    pytest.param("model.layers.0.linear_attn.conv1d.weight", (320, 1, 5), id="conv1d-kernel"),
    pytest.param("model.layers.0.linear_attn.conv1d.weight", (319, 1, 4), id="conv1d-channels"),
    pytest.param("model.layers.0.linear_attn.conv1d.weight", (320, 2, 2), id="conv1d-layout"),
]


@pytest.mark.parametrize("name, bad_shape", SHAPE_CASES)
def test_shape_mismatch_names_tensor_and_both_shapes(checkpoint_copy, name, bad_shape):
    expected = tuple(load_file(checkpoint_copy / weight_map(checkpoint_copy)[name])[name].shape)
    rewrite_shard(checkpoint_copy, name, torch.zeros(bad_shape, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint_copy)
    message = str(err.value)
    assert name in message, message
    assert str(bad_shape) in message, message
    # Tensor-parallel layers describe what they expect before sharding, e.g. "(256, ...)".
    spellings = {str(expected), f"({expected[0]}, ...)", f"(..., {expected[-1]})"}
    if len(expected) == 1:
        spellings.add(f"({expected[0]},)")
    assert any(s in message for s in spellings), f"expected shape {expected} not in: {message}"


@pytest.mark.parametrize("how", ["half", "header-only-4-bytes", "last-100-bytes", "garbage"])
def test_truncated_or_corrupt_shard_is_named(checkpoint_copy, how):
    shard = checkpoint_copy / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    data = {"half": data[: len(data) // 2], "header-only-4-bytes": data[:4], "last-100-bytes": data[:-100],
            "garbage": b"this is not a safetensors file" * 10}[how]
    shard.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint_copy)
    assert str(shard) in str(err.value)


def test_unreadable_index_is_named(checkpoint_copy):
    (checkpoint_copy / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(checkpoint_copy)


def test_no_weights_at_all(tmp_path, checkpoint_copy):
    empty = tmp_path / "only-config"
    empty.mkdir()
    shutil.copy(checkpoint_copy / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(empty)


# ---------------------------------------------------------------- errors: config

def test_missing_config_json(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(checkpoint_copy)


def test_unreadable_config_json(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{ truncated")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(checkpoint_copy)


def test_unknown_model_type(checkpoint_copy):
    edit_json(checkpoint_copy / "config.json", lambda raw: raw.update(model_type="llama_next"))
    with pytest.raises(ConfigError, match="'llama_next'"):
        load_model(checkpoint_copy)


def _set(**fields):
    return lambda raw: raw.update(fields)


def _drop(key):
    return lambda raw: raw.pop(key)


def _rope_params(**fields):
    def edit(raw):
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
                                  "partial_rotary_factor": raw.pop("partial_rotary_factor"), **fields}
    return edit


# (edit of the tiny preset's config.json, words the message must contain)
CONFIG_CASES = [
    pytest.param(_set(num_attention_heads=3), ["num_attention_heads", "num_key_value_heads"], id="heads-not-multiple"),
    pytest.param(_set(linear_num_value_heads=3), ["linear_num_value_heads", "linear_num_key_heads"],
                 id="gdn-heads-not-multiple"),
    pytest.param(_set(layer_types=["linear_attention", "full_attention", "full_attention"]),
                 ["layer_types", "3", "num_hidden_layers"], id="layer_types-length"),
    pytest.param(_set(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
                 ["sliding_attention"], id="layer_types-unknown"),
    pytest.param(_set(partial_rotary_factor=0.3), ["partial_rotary_factor", "0.3", "9"], id="odd-rotary-dim-4x"),
    pytest.param(_rope_params(partial_rotary_factor=0.3), ["partial_rotary_factor", "0.3"], id="odd-rotary-dim-5x"),
    pytest.param(_set(partial_rotary_factor=0.0), ["partial_rotary_factor"], id="zero-rotary"),
    pytest.param(_rope_params(rope_type="yarn", factor=4.0), ["yarn"], id="rope-type"),
    pytest.param(_set(hidden_size=0), ["hidden_size"], id="zero-hidden"),
    pytest.param(_drop("linear_key_head_dim"), ["linear_key_head_dim"], id="missing-field"),
    pytest.param(_set(num_experts_per_tok=9), ["num_experts_per_tok", "num_experts"], id="topk-over-experts"),
    pytest.param(_set(hidden_act="gelu"), ["hidden_act", "gelu"], id="activation"),
]


@pytest.mark.parametrize("edit, words", CONFIG_CASES)
def test_invalid_config_values(checkpoint_copy, edit, words):
    edit_json(checkpoint_copy / "config.json", edit)
    with pytest.raises(ConfigError) as err:
        load_model(checkpoint_copy)
    assert isinstance(err.value, ValueError)
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_dummy_load_format_makes_a_working_model_from_the_config_alone(checkpoint_factory, tmp_path):
    """Random weights from config.json only (no safetensors read): finite logits, the same model
    each time, an MTP layer, and norm weights in their conventions' ranges."""
    source = checkpoint_factory("tiny-dense-mix")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    first = load_model(tmp_path, load_format="dummy")
    second = load_model(tmp_path, load_format="dummy")
    assert first.mtp is not None
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    params = dict(first.named_parameters())
    assert params["model.layers.0.input_layernorm.weight"].abs().max() < 0.2  # zero-centred: y * (1 + w)
    assert (params["model.layers.0.linear_attn.norm.weight"] - 1).abs().max() < 0.2  # plain: y * w
    ids = torch.tensor(json.loads((tmp_path / "config.json").read_text())["bos_token_id"]).repeat(5)
    shapes = CacheShapes.for_model(first, 16, 0, torch.float32, torch.float32)
    allocate_and_bind(first, shapes, 4, 1, "cpu")
    input_ids, positions, ctx = build_step_inputs([SequenceSlice(ids.tolist(), 0, [0], state_group=0)], 16, 1, "cpu")
    with torch.inference_mode(), forward_context(ctx):
        logits = first.compute_logits(first(input_ids, positions))
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_unknown_load_format_is_refused(checkpoint_factory):
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        load_model(checkpoint_factory("tiny"), load_format="pt")
