"""The built-in model's training script, end to end on the CPU: `--smoke` trains a tiny model for a few
steps on a tiny stdlib subset, and the folder it writes must load in our engine and generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import ModelDriver, max_diff
from tests.near_ties import RoutingWatch, assert_no_near_tie
from worker.engine.llm import LLM, SamplingParams
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.model.context import forward_context
from worker.model.loader import load_model
from worker.tools.builtin.export import load_folder
from worker.tools.tiny_tokenizer import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # logits, fp32 on the CPU


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-builtin") / "builtin-smoke"
    path = os.pathsep.join([str(REPO), str(REPO / "proto"), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "worker.tools.train_builtin", "--out", str(out), "--smoke"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def test_progress_lines_and_report(smoke_run):
    out, stdout = smoke_run
    assert "step 1 loss" in stdout and "val step" in stdout
    report = json.loads((out / "train_report.json").read_text())
    for field in ("loss", "top1", "mtp_loss", "mtp_top1", "mtp_agreement", "chain_agreement", "mean_accepted_len_k2"):
        assert 0 <= report["heldout"][field] < 10, field
    training = report["training"]
    assert training["steps"] == 3 and training["tokens_seen"] == 3 * 4 * 64
    assert training["stopped_by"] == "max_steps"
    for field in ("train_time_s", "total_time_s", "device", "versions"):
        assert field in training
    data = report["data"]
    assert data["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert data["files"] > 0 and data["bytes"] > 0 and data["eval_modules"]
    assert report["checks"]["transformers_reload"]["difference"] < 2e-3
    assert {"main", "mtp", "chain"} == set(report["checks"]["causal_trained"])
    assert report["errors"] == {}


def test_folder_is_the_published_layout(smoke_run):
    out, _ = smoke_run
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["architectures"] == ["Qwen3NextForCausalLM"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert {str(f.get_tensor(n).dtype) for n in names} == {"torch.bfloat16"}
    assert "mtp.fc.weight" in names and "mtp.layers.0.mlp.experts.0.gate_proj.weight" in names
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names
    assert "model.layers.2.self_attn.q_proj.weight" in names


def test_our_engine_loads_and_generates(smoke_run):
    out, _ = smoke_run
    prompts = ["def fibonacci(n):\n", "import os\n\n"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with LLM(model=out) as llm:
        plain = [o.token_ids for o in llm.generate(prompts, greedy)]
    with LLM(model=out, speculative_tokens=2) as llm:
        drafted = llm.generate(prompts, greedy)
    assert all(len(tokens) == 12 for tokens in plain)
    assert [o.token_ids for o in drafted] == plain
    assert all(o.num_drafted_tokens > 0 for o in drafted)  # the mtp.* weights were loaded and ran


def _run_mtp(driver: ModelDriver, seq, token_ids: list[int], start: int, hidden: torch.Tensor, step: int = 0):
    """Our MTP over `token_ids` at positions start.., in the MTP layer's own KV cache."""
    input_ids, positions, ctx = build_step_inputs(
        [SequenceSlice(token_ids, start, seq.block_table, seq.group)], driver.block_size, 1, "cpu", with_gdn=False)
    with torch.no_grad(), forward_context(ctx):
        return driver.model.forward_mtp(input_ids, positions, hidden, step=step)


def test_engine_computes_what_was_trained(smoke_run):
    """Our engine's target, MTP and chained-draft logits on the folder equal the training model's (the MTP
    head trained as the engine runs it, chain mask included)."""
    out, _ = smoke_run
    trained = load_folder(out)
    num_rows = 40
    window = torch.randint(0, trained.config.vocab_size, (1, num_rows + 3),
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), RoutingWatch(trained) as watch:
        expected = trained(window)
    assert_no_near_tie(watch.near_ties(), "the training model's routing")
    tokens = window[0].tolist()

    ours = load_model(out, torch.float32)
    driver = ModelDriver(ours)
    seq = driver.new_sequence()
    [logits] = driver.run([driver.prefill(seq, tokens[:num_rows])])
    assert max_diff(logits, expected.main[0]) < ATOL, "target logits"
    drafted = _run_mtp(driver, seq, tokens[1 : num_rows + 1], 0, driver.last_hidden)
    assert max_diff(ours.compute_logits(drafted), expected.mtp[0]) < ATOL, "first draft step"
    chained = _run_mtp(driver, seq, [tokens[num_rows + 1]], num_rows, drafted[-1:], step=1)
    assert max_diff(ours.compute_logits(chained), expected.chain[0, -1:]) < ATOL, "chained draft step"


@pytest.fixture(scope="module")
def distilled_run(smoke_run, tmp_path_factory):
    """--mtp-from on the smoke folder, 4 steps (2 of them on its main model's own text) with validation only at
    the start and the end."""
    trained, _ = smoke_run
    out = tmp_path_factory.mktemp("distill-builtin") / "builtin-smoke-distilled"
    path = os.pathsep.join([str(REPO), str(REPO / "proto"), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "worker.tools.train_builtin", "--out", str(out), "--smoke",
                          "--max-steps", "4", "--mtp-from", str(trained), "--generated-seqs", "6"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return trained, out, run.stdout


def test_distilled_folder_keeps_the_main_model_and_tokenizer(distilled_run):
    trained, out, stdout = distilled_run
    assert "step 1 kl" in stdout and "accepted_len_k2" in stdout
    with safe_open(str(trained / "model.safetensors"), framework="pt") as base, \
            safe_open(str(out / "model.safetensors"), framework="pt") as new:
        assert set(base.keys()) == set(new.keys())
        for name in base.keys():
            if not name.startswith("mtp."):
                assert torch.equal(base.get_tensor(name), new.get_tensor(name)), name
    assert (trained / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    report = json.loads((out / "train_report.json").read_text())
    assert report["errors"] == {}
    assert report["training"]["stage"].startswith("mtp_distillation") and report["training"]["steps"] == 4
    assert report["base"]["from"] == str(trained) and report["base"]["training"]["steps"] == 3
    assert "mean accepted length at k = 2" in report["training"]["weights_kept"] or \
        report["training"]["weights_kept"] == "final"
    own = report["own_text"]
    assert own["sequences"] == {"train": 6, "val": 4, "heldout": 8} and own["prompt_tokens"] == 8
    assert own["heldout_start"]["tokens"] == own["heldout_trained"]["tokens"] == 8 * 21
    assert all("own_accepted_len_k2" in point for point in report["val_curve"])
    # 2 corpus steps of 4 x 64 rows, 2 of 4 * 67 // 24 = 11 continuations of 21 rows
    assert report["training"]["tokens_seen"] == 2 * 4 * 64 + 2 * 11 * 21


def test_greedy_continuations_are_the_models_argmax():
    """The cached continuation's every token is the argmax of the model run afresh on all before it (within
    rounding: a near-tie may go either way)."""
    from worker.tools.builtin.generated import greedy_continuations
    from worker.tools.builtin.model import BuiltinModel
    from worker.tools.train_builtin import RECIPES
    from worker.tools.tiny_checkpoint import published_config

    recipe = RECIPES["smoke"]
    torch.manual_seed(0)
    model = BuiltinModel(published_config(recipe.architecture, "bfloat16", {"<|endoftext|>": 0, "<|im_end|>": 1}))
    prompts = (torch.arange(3 * 7).view(3, 7) * 7919) % recipe.architecture["vocab_size"]
    tokens = greedy_continuations(model.lm, prompts, 12, batch_size=2)
    assert tokens.shape == (3, 19) and torch.equal(tokens[:, :7], prompts)
    with torch.no_grad():
        logits = model.lm(input_ids=tokens[:, :-1], use_cache=False).logits[:, 6:]
    chosen = logits.gather(-1, tokens[:, 7:, None]).squeeze(-1)
    assert (logits.amax(-1) - chosen).max() < 1e-4


def test_distillation_trains_the_head_alone():
    """A few steps move every head tensor and no main-model tensor; the loss is zero where the head already
    predicts the teacher's shifted distributions."""
    import contextlib
    from argparse import Namespace

    from worker.tools.builtin.distill import distill_mtp, distillation_losses
    from worker.tools.builtin.model import BuiltinModel
    from worker.tools.train_builtin import RECIPES
    from worker.tools.tiny_checkpoint import published_config

    recipe = RECIPES["smoke"]
    torch.manual_seed(0)
    model = BuiltinModel(published_config(recipe.architecture, "bfloat16", {"<|endoftext|>": 0, "<|im_end|>": 1}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = torch.arange(4000) * 7919 % recipe.architecture["vocab_size"]
    args = Namespace(weight_decay=0.0, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0, seed=0, mtp_chain_weight=0.5,
                     time_budget_s=600.0, log_every=100, val_every_s=1e9)
    val = stream[: 2 * (recipe.seq_len + 3)].view(2, -1)
    progress, _ = distill_mtp(model, args, recipe, stream, val, torch.device("cpu"), contextlib.nullcontext())
    assert progress.step == recipe.max_steps and len(progress.val_curve) == 2
    after = model.state_dict()
    for name, tensor in before.items():
        moved = not torch.equal(tensor, after[name])
        assert moved == name.startswith("mtp."), name
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(1))
    first, second = distillation_losses(logits, torch.roll(logits, -1, 1), torch.roll(logits, -2, 1))
    assert first.abs() < 1e-6 and second.abs() < 1e-6
