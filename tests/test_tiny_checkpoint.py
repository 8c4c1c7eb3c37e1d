import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.tools import tiny_checkpoint as tc
from worker.tools.tiny_checkpoint import PRESETS, TINY_MODEL_NAME, tiny_model_dir, write_tiny_checkpoint

NON_ASCII_SAMPLE = "Crème brûlée, Straße, Ελληνικά, 你好世界, こんにちは, 🚀👨‍👩‍👧 ok"


@pytest.fixture(scope="module", params=sorted(PRESETS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    preset = request.param
    return preset, write_tiny_checkpoint(tmp_path_factory.mktemp(preset) / "ckpt", preset=preset)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    preset, path = checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return preset, path, model.eval(), info


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("model-*-of-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------- presets

def test_presets_cover_the_required_shapes():
    configs = list(PRESETS.values())
    assert {c["linear_num_value_heads"] // c["linear_num_key_heads"] for c in configs} >= {1, 2}
    assert any(c["head_dim"] != 64 for c in configs)
    assert any(c["linear_key_head_dim"] != c["linear_value_head_dim"] for c in configs)
    assert {c["partial_rotary_factor"] for c in configs} >= {0.25, 0.5}
    assert {c["norm_topk_prob"] for c in configs} == {True, False}
    assert any(c.get("layer_types") for c in configs)
    assert any(
        len({tc.is_moe_layer(c, i) for i in range(c["num_hidden_layers"])}) == 2 for c in configs
    ), "no preset mixes dense and MoE layers"
    for c in configs:
        assert 64 <= c["hidden_size"] <= 128 and 512 <= c["vocab_size"] <= 1024


def test_tiny_preset_shapes_follow_published_layout(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ckpt", preset="tiny", shards=1)
    shapes = {name: tuple(t.shape) for name, t in stored_tensors(path).items()}
    hidden, nk, nv, dk, dv = 64, 2, 4, 32, 48
    linear = "model.layers.0.linear_attn"
    assert shapes[f"{linear}.in_proj_qkvz.weight"] == (nk * (2 * dk + 2 * (nv // nk) * dv), hidden)
    assert shapes[f"{linear}.in_proj_ba.weight"] == (2 * nv, hidden)
    assert shapes[f"{linear}.conv1d.weight"] == (2 * nk * dk + nv * dv, 1, 4)
    assert shapes[f"{linear}.norm.weight"] == (dv,)
    assert shapes[f"{linear}.out_proj.weight"] == (hidden, nv * dv)
    attn = "model.layers.3.self_attn"
    assert shapes[f"{attn}.q_proj.weight"] == (4 * 32 * 2, hidden)
    assert shapes[f"{attn}.k_proj.weight"] == (2 * 32, hidden)
    assert shapes[f"{attn}.o_proj.weight"] == (hidden, 4 * 32)
    assert shapes["model.layers.3.mlp.experts.7.down_proj.weight"] == (hidden, 32)
    assert shapes["model.layers.3.mlp.shared_expert_gate.weight"] == (1, hidden)
    assert shapes["mtp.fc.weight"] == (hidden, 2 * hidden)
    assert shapes["mtp.layers.0.mlp.experts.0.gate_proj.weight"] == (32, hidden)
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (1024, hidden)


def test_explicit_layer_types_are_written_instead_of_an_interval(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ckpt", preset="tiny-dense-mix")
    config = read_json(path / "config.json")
    assert config["layer_types"] == PRESETS["tiny-dense-mix"]["layer_types"]
    assert "full_attention_interval" not in config
    assert "num_nextn_predict_layers" not in config


# ---------------------------------------------------------------- Hugging Face loading

def test_transformers_loads_every_weight(loaded):
    preset, _, model, info = loaded
    assert model.config.model_type == "qwen3_next"
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert all(key.startswith("mtp.") for key in info["unexpected_keys"])
    assert model.config.layer_types == tc.layer_types(PRESETS[preset])


def test_loaded_parameters_equal_stored_values(loaded):
    _, path, model, _ = loaded
    stored = stored_tensors(path)
    params = dict(model.named_parameters())
    for name, value in params.items():
        if ".mlp.experts." in name:
            continue  # fused by transformers; checked below
        assert torch.equal(value.detach(), stored[name].float()), name

    config = model.config
    intermediate = config.moe_intermediate_size
    fused_layers = [n.removesuffix(".mlp.experts.gate_up_proj") for n in params if n.endswith("gate_up_proj")]
    assert fused_layers, "no MoE layer loaded"
    for layer in fused_layers:
        gate_up = params[f"{layer}.mlp.experts.gate_up_proj"].detach()
        down = params[f"{layer}.mlp.experts.down_proj"].detach()
        for expert in range(config.num_experts):
            prefix = f"{layer}.mlp.experts.{expert}"
            assert torch.equal(gate_up[expert, :intermediate], stored[f"{prefix}.gate_proj.weight"].float())
            assert torch.equal(gate_up[expert, intermediate:], stored[f"{prefix}.up_proj.weight"].float())
            assert torch.equal(down[expert], stored[f"{prefix}.down_proj.weight"].float())


def test_dense_and_moe_layers_match_the_config(loaded):
    preset, _, model, _ = loaded
    for i, layer in enumerate(model.model.layers):
        expect_moe = tc.is_moe_layer(PRESETS[preset], i)
        assert hasattr(layer.mlp, "experts") == expect_moe, f"layer {i}"


def test_forward_gives_finite_well_spread_logits(loaded):
    _, _, model, _ = loaded
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    assert 2.0 <= logits.std().item() <= 4.0


# ---------------------------------------------------------------- weights on disk

def test_no_norm_dt_bias_or_a_log_is_constant(checkpoint):
    _, path = checkpoint
    perturbed = re.compile(r"(norm\.weight|dt_bias|A_log)$")
    names = [name for name in stored_tensors(path) if perturbed.search(name)]
    assert any("A_log" in n for n in names) and any("mtp." in n for n in names)
    for name, tensor in stored_tensors(path).items():
        if perturbed.search(name):
            assert tensor.float().std() > 0.01, name

    for name, tensor in stored_tensors(path).items():
        if name.endswith(("dt_bias", "A_log")):
            assert len(set(tensor.float().tolist())) == tensor.numel(), f"two heads share a value in {name}"
    a_log = torch.cat([t.float() for n, t in stored_tensors(path).items() if n.endswith("A_log")])
    assert a_log.exp().min() >= 0.99 and a_log.exp().max() <= 16.1


def test_index_lists_every_tensor_across_at_least_three_shards(checkpoint):
    _, path = checkpoint
    index = read_json(path / "model.safetensors.index.json")
    shard_files = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shard_files) >= 3
    assert set(index["weight_map"].values()) == set(shard_files)
    total_size = 0
    for shard in shard_files:
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                total_size += tensor.numel() * tensor.element_size()
    assert len(index["weight_map"]) == len(stored_tensors(path))
    assert index["metadata"]["total_size"] == total_size


def test_mtp_weights_are_present_and_optional(tmp_path):
    with_mtp = stored_tensors(write_tiny_checkpoint(tmp_path / "mtp", preset="tiny"))
    without_mtp = stored_tensors(write_tiny_checkpoint(tmp_path / "no-mtp", preset="tiny", mtp=False))
    mtp_names = {n for n in with_mtp if n.startswith("mtp.")}
    for name in ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
                 "mtp.norm.weight", "mtp.layers.0.self_attn.q_norm.weight", "mtp.layers.0.mlp.gate.weight"):
        assert name in mtp_names
    assert set(without_mtp) == set(with_mtp) - mtp_names
    assert all(torch.equal(without_mtp[n], with_mtp[n]) for n in without_mtp)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = file_hashes(write_tiny_checkpoint(tmp_path / "a", seed=7))
    again = file_hashes(write_tiny_checkpoint(tmp_path / "b", seed=7))
    other = file_hashes(write_tiny_checkpoint(tmp_path / "c", seed=8))
    assert first == again
    weights = [name for name in first if name.endswith(".safetensors")]
    assert all(first[name] != other[name] for name in weights)


def test_cli_honours_shards_dtype_and_no_mtp(tmp_path):
    out = tmp_path / "cli"
    tc.main([str(out), "--preset", "tiny-tp", "--shards", "5", "--dtype", "float32", "--no-mtp", "--seed", "3"])
    assert len(list(out.glob("model-*-of-00005.safetensors"))) == 5
    tensors = stored_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert not any(n.startswith("mtp.") for n in tensors)
    assert read_json(out / "config.json")["torch_dtype"] == "float32"


def test_refuses_to_write_into_a_non_empty_directory(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_tiny_checkpoint(tmp_path)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_loads_offline_and_round_trips_non_ascii(checkpoint):
    preset, path = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tokenizer) <= PRESETS[preset]["vocab_size"]
    ids = tokenizer.encode(NON_ASCII_SAMPLE)
    assert tokenizer.decode(ids) == NON_ASCII_SAMPLE
    # Byte-level BPE: some multi-byte characters must be split over several tokens.
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)


def test_chat_template_renders_chatml(checkpoint):
    _, path = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ☕"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi ☕<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_eos_ids_agree_between_tokenizer_and_configs(checkpoint):
    _, path = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = read_json(path / "config.json")
    generation = read_json(path / "generation_config.json")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    assert config["eos_token_id"] == im_end and config["bos_token_id"] == endoftext
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert generation["do_sample"] is False
    assert max(im_end, endoftext) < config["vocab_size"]


# ---------------------------------------------------------------- the cached random preset

def test_tiny_model_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_CACHE", str(tmp_path))
    first = tiny_model_dir()
    assert first == tmp_path / TINY_MODEL_NAME
    assert (first / "model.safetensors.index.json").exists()

    def must_not_rewrite(*args, **kwargs):
        raise AssertionError("tiny model rewritten")

    monkeypatch.setattr(tc, "write_tiny_checkpoint", must_not_rewrite)
    assert tiny_model_dir() == first
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_NAME]
