"""Tensor parallelism at speed: the engine at tp 1 and tp 2 on one Qwen3-Next-80B-shaped checkpoint,
printed as JSON.

    python benchmarks/bench_tp.py [--layers 4] [--batches 1 16 64] [--ks 0 2] [--tps 1 2]
        [--one-shot-norm 0 1] [--checkpoint DIR] [--out FILE] [--smoke]

Needs as many GPUs of one host as the largest --tps. The checkpoint is bench_engine_vs_hf's
(transformers' random init at the 80B's per-layer shapes, plus random mtp.* tensors, bf16), written
once, so every tp reads the same weights. Per engine (tp, and at tp > 1 each NEXTSERVE_ONE_SHOT_NORM
setting of --one-shot-norm: the all-reduce fused with the add + norm, or not), k and batch: decode
ms/step, tokens/s and the mean accepted length (128-token prompts, greedy). `speedup_over_tp1` is a
row's tokens/s over tp 1's at the same k and batch: the goal is at least 1.6 at batch 1, tp 2.
`all_reduce` says what rank 0 reduced with. `--smoke` runs the built-in model on the CPU (gloo), tp 1
and 2, batch 1, k 0 (CI).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine_vs_hf import (_mean_accepted, decode_rates, engine_for, prompts_for,  # noqa: E402
                                           run_batch, write_checkpoint)
from benchmarks.gpu_bench import card, ceilings, emit, free_engine_memory, git_commit, save_partial  # noqa: E402
from worker.distributed import get_tp  # noqa: E402
from worker.parallel import all_reduce  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--one-shot-norm", choices=["0", "1"], nargs="+", default=["0", "1"],
                        help="NEXTSERVE_ONE_SHOT_NORM settings each tp > 1 engine runs under")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/nextserve-80b-shape"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="the built-in model on the CPU, tp 1 and 2, batch 1")
    return parser.parse_args()


def set_one_shot_norm(value: str) -> None:
    """For the next engine: its rank processes inherit the environment; rank 0 (this process) rereads it."""
    os.environ["NEXTSERVE_ONE_SHOT_NORM"] = value
    all_reduce.one_shot_norm_enabled.cache_clear()


def measure(model_dir: Path, tp: int, k: int, batches: list[int], new_tokens: int, device: str,
            dtype: str) -> tuple[list[dict], str]:
    engine = engine_for(model_dir, k, batches, device, dtype, tensor_parallel_size=tp)
    reducer = get_tp().reducer.describe()
    rows = []
    try:
        for batch in batches:
            prompts = prompts_for(batch, engine.model_config.vocab_size)
            run_batch(engine, prompts[:1], 2)  # warm-up
            m = run_batch(engine, prompts, new_tokens)
            ms, tokens_per_s = decode_rates(m)
            rows.append(dict(tp=tp, k=k, batch=batch, ms_per_step=round(ms, 3),
                             decode_tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None,
                             mean_accepted_length=_mean_accepted(m["outputs"])))
            print(rows[-1], file=sys.stderr)
    finally:
        engine.shutdown()
        del engine
        free_engine_memory()
    return rows, reducer


def main():
    args = parse_args()
    result = dict(benchmark="bench_tp", commit=git_commit(), command=" ".join([Path(sys.executable).name, *sys.argv]),
                  rows=[])
    if args.smoke:
        from worker.tools.builtin_model import builtin_model_dir

        model_dir, device, dtype = builtin_model_dir(), "cpu", "float32"
        args.tps, args.batches, args.ks, args.new_tokens, args.one_shot_norm = [1, 2], [1], [0], 2, ["0"]
    else:
        if torch.cuda.device_count() < max(args.tps):
            sys.exit(f"bench_tp.py needs {max(args.tps)} GPUs of one host; {torch.cuda.device_count()} visible")
        model_dir, device, dtype = write_checkpoint(args.checkpoint, args.layers, "cuda"), "cuda", "bfloat16"
        result.update(card=card(), gpus=torch.cuda.device_count(), ceilings=ceilings(), layers=args.layers)
    tp1, initial_norm = {}, os.environ.get("NEXTSERVE_ONE_SHOT_NORM")
    for tp in args.tps:
        for norm in args.one_shot_norm if tp > 1 else ["0"]:
            set_one_shot_norm(norm)
            for k in args.ks:
                rows, reducer = measure(model_dir, tp, k, args.batches, args.new_tokens, device, dtype)
                for row in rows:
                    row.update(one_shot_norm=norm == "1" and tp > 1, all_reduce=reducer)
                    if tp == 1:
                        tp1[(k, row["batch"])] = row["decode_tokens_per_s"]
                    elif tp1.get((k, row["batch"])) and row["decode_tokens_per_s"]:
                        row["speedup_over_tp1"] = round(row["decode_tokens_per_s"] / tp1[(k, row["batch"])], 2)
                result["rows"] += rows
                save_partial(result, args.out)
    os.environ.pop("NEXTSERVE_ONE_SHOT_NORM")
    if initial_norm is not None:  # emit's `env` shows the setting the run started with; rows give their own
        os.environ["NEXTSERVE_ONE_SHOT_NORM"] = initial_norm
    emit(result, args.out)


if __name__ == "__main__":
    main()
