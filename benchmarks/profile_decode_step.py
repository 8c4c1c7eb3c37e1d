"""Which kernels a decode step runs and how long each takes on the GPU, printed as JSON.

    python benchmarks/profile_decode_step.py [--batch 1] [--k 0] [--layers 4] [--quantize fp8] [--draft-vocab N]
        [--out FILE]

Qwen3-Next-80B's per-layer shapes with random weights made on the device (`load_format="dummy"`).
After a few steps, one decode step's graph is replayed under torch.profiler (CUDA activity), and
the kernels are grouped by name: calls, total and mean µs, share of the step. Before that, back-to-back
replays are timed with CUDA events (`graph_replay_us`, the gaps between kernels included). The bytes roofline
of the step is what `bench_engine_vs_hf.py` reports; this says where the rest goes.
"""

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import back_to_back_replay_us, card, emit, git_commit, lone_replay_us  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.engine.sampling_params import SamplingParams  # noqa: E402
from worker.kernels.pdl import use_pdl  # noqa: E402
from worker.tools.model_shapes import write_shape_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--replays", type=int, default=10, help="graph replays under the profiler")
    parser.add_argument("--timed-replays", type=int, default=200, help="graph replays timed back to back")
    parser.add_argument("--quantize", choices=["fp8"], default=None, help="the published FP8 layout")
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="k > 0: the MTP head drafts over the first N token ids (speculative_token_map)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = write_shape_config(Path(tempfile.mkdtemp()), num_layers=args.layers, quantize=args.quantize)
    map_args = {}
    if args.draft_vocab:
        map_path = model_dir / "draft_vocab.json"
        map_path.write_text(json.dumps(list(range(args.draft_vocab))))
        map_args = dict(speculative_token_map=str(map_path))
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                                    speculative_tokens=args.k, max_num_seqs=max(8, args.batch), max_model_len=1024,
                                    gpu_memory_utilization=0.8, **map_args))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", torch.randint(0, 150000, (128,), generator=gen).tolist(), params)
    for _ in range(4):
        engine.step()
    graph = engine.worker.decode_graphs.graph_for(args.batch)
    graph.replay()
    torch.cuda.synchronize()
    replay_us = back_to_back_replay_us(graph, args.timed_replays)
    lone = lone_replay_us(graph, args.timed_replays)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
    total = sum(us for _, us in kernels.values()) / args.replays
    rows = sorted(({"kernel": name[:120], "calls_per_step": calls / args.replays, "us_per_step": round(us / args.replays, 2),
                    "share": round(us / args.replays / total, 4)} for name, (calls, us) in kernels.items()),
                  key=lambda r: -r["us_per_step"])
    emit(dict(benchmark="profile_decode_step", card=card(), commit=git_commit(), batch=args.batch, k=args.k,
              layers=args.layers, quantize=args.quantize, draft_vocab=args.draft_vocab, pdl=use_pdl(torch.device("cuda")),
              graph_replay_us=round(replay_us, 1), lone_replay=lone, kernel_us_per_step=round(total, 1),
              kernels_per_step=sum(r["calls_per_step"] for r in rows), rows=rows), args.out)
    engine.shutdown()


if __name__ == "__main__":
    main()
