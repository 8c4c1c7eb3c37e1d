"""The whole Qwen3-Next-80B shape in FP8 on one GPU, with random weights made on the device.

    python benchmarks/bench_fp8_80b.py [--layers 48] [--batches 1 16 64 256] [--ks 0 1 2 3] [--async-ks 0] [--out FILE]

The published FP8 layout (`quantization_config`: e4m3, 128 x 128 weight blocks, dynamic activations)
from config.json alone (`load_format="dummy"`). In the same process: the copy rate, then per k and
batch the decode ms/step and tokens/s (128-token prompts, greedy; the MTP head's random weights
accept little, so k > 0 rows show the cost of drafting; the --async-ks also with async scheduling,
the host planning step n+1 while the GPU runs step n), the ratio to the FP8 bytes roofline at
k = 0 (the bytes of the weights a step reads: non-expert weights, the distinct experts it touched,
their scales, KV and GDN states, over the copy rate), the memory left for KV blocks and state slots
and the concurrency it allows at 8k context; then FP8 against bf16 ms/step on the 4-layer shape.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine_vs_hf import (decode_rates, engine_for, prompts_for, run_batch,  # noqa: E402
                                           step_bytes)
from benchmarks.gpu_bench import card, ceilings, emit, free_engine_memory, git_commit, save_partial  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.tools.model_shapes import write_shape_config  # noqa: E402

CONTEXT = 8192


def engine(model_dir: Path, k: int, batches: list[int], async_scheduling: bool = False) -> LLMEngine:
    return engine_for(model_dir, k, batches, "cuda", "bfloat16", load_format="dummy", max_model_len=CONTEXT,
                      gpu_memory_utilization=0.92, async_scheduling=async_scheduling)


def cache_memory(e: LLMEngine) -> dict:
    plan, shapes = e.cache_plan, e.shapes
    return dict(kv_blocks=plan.num_blocks, state_groups=plan.num_state_groups,
                cache_GiB=round((plan.num_blocks * shapes.bytes_per_block
                                 + plan.num_state_groups * shapes.bytes_per_state_group) / 2**30, 2),
                weights_GiB=round(sum(p.numel() * p.element_size() for p in e.model.parameters()) / 2**30, 2),
                max_concurrency_at_8k=round(plan.max_concurrency(e.config.block_size, CONTEXT), 1))


def measure(e: LLMEngine, k: int, batches, new_tokens: int, rates: dict | None, scheduling: str = "sync") -> list[dict]:
    rows = []
    for batch in batches:
        prompts = prompts_for(batch, e.model_config.vocab_size)
        run_batch(e, prompts[:1], 2)  # warm-up
        m = run_batch(e, prompts, new_tokens)
        ms, tokens_per_s = decode_rates(m)
        row = dict(k=k, scheduling=scheduling, batch=batch, ms_per_step=round(ms, 3),
                   decode_tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None)
        if k == 0 and rates:
            traffic = step_bytes(e, prompts)
            roofline_ms = traffic["bytes"] / rates["copy_GBps"] / 1e6
            row.update(bytes=traffic["bytes"], roofline_ms=round(roofline_ms, 4),
                       fraction_of_roofline=round(roofline_ms / ms, 3))
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--async-ks", type=int, nargs="*", default=[0],
                        help="ks also run with async scheduling (the host plans step n+1 while step n runs)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rates = ceilings()
    result = dict(benchmark="bench_fp8_80b", card=card(), commit=git_commit(), ceilings=rates, layers=args.layers,
                  rows=[], memory={})
    root = Path(tempfile.mkdtemp())
    full = write_shape_config(root / "fp8-full", num_layers=args.layers, quantize="fp8")
    runs = [(k, "sync") for k in args.ks] + [(k, "async") for k in args.async_ks]
    for k, scheduling in runs:
        e = engine(full, k, args.batches, async_scheduling=scheduling == "async")
        if scheduling == "sync":
            result["memory"][f"k{k}"] = cache_memory(e)
        result["rows"] += measure(e, k, args.batches, args.new_tokens, rates, scheduling)
        save_partial(result, args.out)
        e.shutdown()
        del e
        free_engine_memory()
    small = {"fp8": write_shape_config(root / "fp8-4", num_layers=4, quantize="fp8"),
             "bf16": write_shape_config(root / "bf16-4", num_layers=4)}
    result["four_layers"] = {}
    for name, model_dir in small.items():
        e = engine(model_dir, 0, args.batches)
        result["four_layers"][name] = measure(e, 0, args.batches, args.new_tokens, None)
        save_partial(result, args.out)
        e.shutdown()
        del e
        free_engine_memory()
    emit(result, args.out)


if __name__ == "__main__":
    main()
