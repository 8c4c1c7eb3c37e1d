"""The built-in model's training script, end to end on the CPU: `--smoke` trains a tiny model for a few
steps on a tiny stdlib subset, and the folder it writes must load in our engine and generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from worker.engine.llm import LLM, SamplingParams
from worker.tools.tiny_tokenizer import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[1]


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
