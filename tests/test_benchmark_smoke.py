"""The engine benchmarks run end to end (the built-in model on the CPU), so the scripts the
GPU sessions rely on cannot rot between them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_engine_vs_hf_smoke(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_engine_vs_hf.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["k"], r["drafts"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(0, "none", 1), (0, "none", 2), (0, "async", 1), (0, "async", 2), (1, "mtp", 1), (1, "mtp", 2), (1, "scripted", 1),
                         (1, "scripted", 2)}
    assert all(r["decode_steps"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert set(result["hf_ms_per_step"]) == {"1", "2"}
    # Always-right drafts: every verification accepts its draft, so a step emits 2 tokens per sequence.
    for batch in (1, 2):
        scripted = rows[(1, "scripted", batch)]
        assert scripted["decode_tokens"] / scripted["decode_steps"] / batch >= 1.5


def test_bench_tp_smoke(tmp_path):
    """tp 1 then a tp 2 worker group (gloo) in one process, each row against tp 1's."""
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_tp.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["tp"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {1, 2}
    assert rows[1]["all_reduce"] == "one rank: no all-reduce" and rows[2]["all_reduce"] == "gloo for every message"
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert rows[2]["speedup_over_tp1"] == round(rows[2]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"], 2)
