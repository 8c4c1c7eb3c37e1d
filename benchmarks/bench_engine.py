"""Offline engine throughput: steps/s, tokens/s and mean accepted length, printed as JSON.

    python benchmarks/bench_engine.py [--model DIR] [--batch 16] [--prompt-len 128] [--max-tokens 128]
        [-k 2] [--device cpu|cuda] [--dtype float32|bfloat16]

With no --model it runs the built-in tiny checkpoint.
"""

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import git_commit  # noqa: E402
from worker import LLM, SamplingParams  # noqa: E402
from worker.engine.llm_engine import pooled_accepted_length  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", "--speculative-tokens", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, speculative_tokens=args.speculative_tokens,
              max_num_seqs=max(args.batch, 1), max_num_batched_tokens=args.max_num_batched_tokens)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True, seed=args.seed)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)  # warm-up

    steps = [0]
    launch = llm.engine.runner.launch

    def counted(plan, *args, **kwargs):
        steps[0] += bool(plan.sequences)
        return launch(plan, *args, **kwargs)

    llm.engine.runner.launch = counted
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    generated = sum(len(o.token_ids) for o in outputs)
    accepted_length = pooled_accepted_length(outputs)
    print(json.dumps({
        "model": str(llm.model_dir),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "speculative_tokens": args.speculative_tokens,
        "elapsed_s": round(elapsed, 4),
        "steps": steps[0],
        "steps_per_s": round(steps[0] / elapsed, 2),
        "output_tokens_per_s": round(generated / elapsed, 2),
        "total_tokens_per_s": round((generated + args.batch * args.prompt_len) / elapsed, 2),
        "mean_accepted_length": round(accepted_length, 4) if accepted_length else None,
        "commit": git_commit(),
    }))


if __name__ == "__main__":
    main()
