"""The built-in model (worker/assets/builtin-code-v2): shipped as trained, served when no model is given,
equal to transformers where its greedy choices are decided, and with an MTP head that really drafts.

The prompts open functions of standard-library modules held out of training (worker/tools/builtin/heldout.py)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tests.engine_helpers import assert_equal_to_reference, hf_greedy
from worker import LLM, SamplingParams
from worker.engine.llm_engine import pooled_accepted_length
from worker.tools import builtin_model as bm
from worker.tools.builtin.heldout import HELD_OUT_PROMPTS
from worker.tools.builtin_model import (
    ASSET_DIR,
    BUILTIN_MODEL_NAME,
    MODEL_FILES,
    builtin_model_dir,
)

MAX_TOKENS = 48
ACCEPTED_LENGTH_GOAL = 1.8  # tokens per verify step at k = 2 (the trained head drafts ~2.1-2.5 here)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXTSERVE_CACHE", str(cache))
        return builtin_model_dir()


@pytest.fixture(scope="module")
def prompts(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(p) for p in HELD_OUT_PROMPTS]


def run(model_dir, prompts, k):
    """-> (outputs, tokens emitted per verify step over all requests)."""
    with LLM(model_dir, speculative_tokens=k) as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return outputs, pooled_accepted_length(outputs) if k else 1.0


def test_the_package_ships_the_trained_model_and_its_report():
    report = json.loads((ASSET_DIR / "train_report.json").read_text())
    assert report["errors"] == {}
    assert report["heldout"]["top1"] >= 0.50 and report["heldout"]["mtp_agreement"] >= 0.60, report["heldout"]
    assert (ASSET_DIR / "model.safetensors").stat().st_size <= 10_000_000
    with safe_open(ASSET_DIR / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert any(n.startswith("mtp.layers.0.") for n in names) and "mtp.fc.weight" in names
    config = json.loads((ASSET_DIR / "config.json").read_text())
    assert 1 < config["full_attention_interval"] <= config["num_hidden_layers"]  # GDN and gated attention layers
    assert config["num_experts"] > config["num_experts_per_tok"] and config["shared_expert_intermediate_size"]
    assert "chat_template" in json.loads((ASSET_DIR / "tokenizer_config.json").read_text())


def test_it_is_copied_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_CACHE", str(tmp_path))
    (tmp_path / "builtin-tiny-v2").mkdir()  # an older built-in model stays where it is, unused
    first = builtin_model_dir()
    assert first == tmp_path / BUILTIN_MODEL_NAME
    assert all((first / n).read_bytes() == (ASSET_DIR / n).read_bytes() for n in MODEL_FILES)

    def must_not_copy(*args, **kwargs):
        raise AssertionError("built-in model copied again")

    monkeypatch.setattr(bm.shutil, "copyfile", must_not_copy)
    assert builtin_model_dir() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([BUILTIN_MODEL_NAME, "builtin-tiny-v2"])


def test_llm_without_a_model_serves_it(model_dir, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_CACHE", str(model_dir.parent))
    with LLM() as llm:
        assert llm.model_dir == model_dir


def test_the_worker_without_a_model_serves_it(model_dir, monkeypatch):
    from worker.server.main import engine_config, parse_args

    monkeypatch.setenv("NEXTSERVE_CACHE", str(model_dir.parent))
    assert engine_config(parse_args([])).model == str(model_dir)


def test_greedy_equals_transformers_and_mtp_k2_equals_k0(model_dir, prompts):
    references = hf_greedy(model_dir, prompts, MAX_TOKENS)
    plain, _ = run(model_dir, prompts, 0)
    assert_equal_to_reference(plain, references)
    speculative, accepted_length = run(model_dir, prompts, 2)
    assert [o.token_ids for o in speculative] == [o.token_ids for o in plain]
    assert accepted_length >= ACCEPTED_LENGTH_GOAL, f"{accepted_length:.2f} tokens per verify step at k = 2"


def test_acceptance_collapses_without_the_trained_head(model_dir, prompts, tmp_path):
    """What a loader that dropped mtp.* would serve (a head that predicts nothing): still lossless, but the
    acceptance check above would fail, so that bug cannot pass silently."""
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, tmp_path / name)
    tensors = load_file(model_dir / "model.safetensors")
    for name in tensors:
        if name.startswith("mtp.fc."):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    plain, _ = run(model_dir, prompts[:2], 0)
    speculative, accepted_length = run(tmp_path, prompts[:2], 2)
    assert [o.token_ids for o in speculative] == [o.token_ids for o in plain]
    assert accepted_length < 1.2 < ACCEPTED_LENGTH_GOAL
