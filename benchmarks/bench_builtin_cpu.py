"""MTP speculative decoding on the CPU with the built-in model: tokens/s at k = 1, 2, 3 against k = 0 in one run.

    python benchmarks/bench_builtin_cpu.py [--batches 1 8] [--ks 0 1 2 3] [--max-tokens 128] [--repeats 3] [--out FILE]
                                           [--model DIR]   # a candidate folder instead of the built-in model

Greedy continuations of the held-out code prompts (worker/tools/builtin/heldout.py), batch b taking the
first b of them. Each (batch, k) is timed --repeats times after a warm-up. The ks take turns within each
repeat, in the opposite order every other repeat, so that a machine that speeds up or slows down (a shared
CPU does, by tens of percent within seconds) moves every k alike. Three speed-ups against k = 0 are given:
of the fastest runs (`speedup_vs_k0`), of the median runs, and the median over repeats of the ratio of
k = 0's run to k's in the same repeat (`speedup_vs_k0_paired`, the least moved by noise); the range of
those paired ratios shows how noisy the machine was. The tokens are checked equal to k = 0's (MTP
is lossless), and the mean accepted length (tokens per verify step) is reported beside the speed-up.
Prints JSON with the machine's description.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import emit, git_commit  # noqa: E402
from worker import LLM, SamplingParams  # noqa: E402
from worker.engine.llm_engine import pooled_accepted_length  # noqa: E402
from worker.tools.builtin.heldout import HELD_OUT_PROMPTS  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def timed_run(llm: LLM, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def measure(llms: dict[int, LLM], batch: int, prompts: list[list[int]], args) -> dict[int, dict]:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs = {k: [] for k in llms}
    for repeat in range(args.repeats):
        order = list(llms) if repeat % 2 == 0 else list(reversed(llms))
        for k in order:
            runs[k].append(timed_run(llms[k], prompts[:batch], params))
    rows = {}
    for k, timed in runs.items():
        elapsed = [t for t, _ in timed]
        outputs = timed[0][1]
        generated = sum(len(o.token_ids) for o in outputs)
        accepted_length = pooled_accepted_length(outputs)
        rows[k] = {
            "k": k, "batch": batch,
            # The fastest run is the least disturbed one: a shared CPU only ever slows a run down.
            "elapsed_s": round(min(elapsed), 4),
            "median_elapsed_s": round(statistics.median(elapsed), 4),
            "elapsed_runs_s": [round(t, 4) for t in elapsed],
            "output_tokens_per_s": round(generated / min(elapsed), 2),
            "mean_accepted_length": round(accepted_length, 4) if accepted_length else None,
            "tokens": [o.token_ids for o in outputs],
        }
    return rows


def speedups(row: dict, base: dict) -> dict:
    """k's speed-ups against k = 0 from the same batch's runs (see the module docstring)."""
    paired = sorted(b / t for b, t in zip(base["elapsed_runs_s"], row["elapsed_runs_s"]))
    return {
        "speedup_vs_k0": round(base["elapsed_s"] / row["elapsed_s"], 3),
        "speedup_vs_k0_of_medians": round(base["median_elapsed_s"] / row["median_elapsed_s"], 3),
        "speedup_vs_k0_paired": round(statistics.median(paired), 3),
        "speedup_vs_k0_paired_range": [round(paired[0], 3), round(paired[-1], 3)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default=None, help="a model folder (default: the built-in model)")
    args = parser.parse_args()
    if max(args.batches) > len(HELD_OUT_PROMPTS):
        parser.error(f"at most {len(HELD_OUT_PROMPTS)} prompts (the held-out set)")
    if 0 not in args.ks:
        parser.error("k = 0 is the baseline: keep it in --ks")
    llms = {k: LLM(model=args.model, speculative_tokens=k, max_num_seqs=max(args.batches)) for k in args.ks}
    baseline = llms[0]
    prompts, model = [baseline.tokenizer.encode(p) for p in HELD_OUT_PROMPTS], str(baseline.model_dir)
    warm_up = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for llm in llms.values():
        llm.generate(prompts[:1], warm_up, use_tqdm=False)
    by_batch = {batch: measure(llms, batch, prompts, args) for batch in args.batches}
    for llm in llms.values():
        llm.shutdown()
    rows = []
    for k in args.ks:
        for batch in args.batches:
            row, base = by_batch[batch][k], by_batch[batch][0]
            row.update(speedups(row, base))
            row["tokens_equal_k0"] = row["tokens"] == base["tokens"]
            rows.append(row)
    for row in rows:
        del row["tokens"]
    result = {"benchmark": "bench_builtin_cpu", "model": model, "device": "cpu", "dtype": "float32",
              "machine": machine(), "max_tokens": args.max_tokens, "repeats": args.repeats,
              "command": " ".join(["python", *sys.argv]), "commit": git_commit(), "rows": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
