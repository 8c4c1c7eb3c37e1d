"""lm-evaluation-harness itself against the HTTP API, on two tiny tasks shipped in lm_eval_tasks/.

`local-completions` runs a loglikelihood task (echo + logprobs requests, lm-eval tokenizing through
our /tokenize and /tokenizer_info) and a gsm8k-shaped generation task; `local-chat-completions` runs
the generation task through the chat template. Each must report its metrics; the loglikelihoods are
also checked against lm-eval's own `hf` backend on the same checkpoint, so the numbers are right,
not merely present.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.tools.tiny_checkpoint import TINY_MODEL_NAME as MODEL

TASKS = Path(__file__).parent / "lm_eval_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.slow


def lm_eval(output: Path, *args: str) -> tuple[dict, list[dict]]:
    """Run the lm_eval command from the tasks folder; -> (results of its JSON report, logged samples)."""
    command = [sys.executable, "-m", "lm_eval", "run", "--include_path", ".", "--output_path", str(output),
               "--log_samples", *args]
    done = subprocess.run(command, cwd=TASKS, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [report] = output.rglob("results_*.json")
    samples = [json.loads(line) for path in output.rglob("samples_*.jsonl") for line in path.read_text().splitlines()]
    return json.loads(report.read_text())["results"], samples


def completions_args(http_port: int, endpoint: str) -> str:
    return (f"model={MODEL},base_url=http://127.0.0.1:{http_port}/v1/{endpoint},num_concurrent=2,"
            f"max_retries=1")


def test_local_completions_reports_both_tasks_with_the_hf_backends_loglikelihoods(served, model_dir, tmp_path):
    results, samples = lm_eval(tmp_path / "api", "--model", "local-completions",
                               "--model_args", completions_args(served[0], "completions"),
                               "--tasks", "nextserve_tiny_choice", "nextserve_tiny_arith")
    choice, arith = results["nextserve_tiny_choice"], results["nextserve_tiny_arith"]
    assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1
    assert 0 <= arith["exact_match,strict-match"] <= 1
    served_scores = {(s["doc_id"], i): float(r[0][0]) for s in samples if "choices" in s["doc"]
                     for i, r in enumerate(s["resps"])}
    assert len(served_scores) == 18  # six questions, three choices each
    generated = [s["resps"][0][0] for s in samples if "choices" not in s["doc"]]
    assert len(generated) == 6 and all(isinstance(text, str) for text in generated)

    reference, ref_samples = lm_eval(tmp_path / "hf", "--model", "hf", "--device", "cpu",
                                     "--model_args", f"pretrained={model_dir},dtype=float32",
                                     "--tasks", "nextserve_tiny_choice")
    hf_scores = {(s["doc_id"], i): float(r[0][0]) for s in ref_samples for i, r in enumerate(s["resps"])}
    assert hf_scores.keys() == served_scores.keys()
    assert max(abs(hf_scores[key] - served_scores[key]) for key in hf_scores) < 1e-3
    assert reference["nextserve_tiny_choice"]["acc,none"] == choice["acc,none"]


def test_local_chat_completions_reports_the_generation_task(served, tmp_path):
    results, samples = lm_eval(tmp_path / "chat", "--model", "local-chat-completions",
                               "--model_args", completions_args(served[0], "chat/completions"),
                               "--apply_chat_template", "--tasks", "nextserve_tiny_arith")
    assert 0 <= results["nextserve_tiny_arith"]["exact_match,strict-match"] <= 1
    assert len(samples) == 6 and all(isinstance(s["resps"][0][0], str) for s in samples)
