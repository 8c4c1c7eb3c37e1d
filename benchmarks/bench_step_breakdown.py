"""Where a decode step's time goes: the whole `engine.step()` against the replay of its CUDA graph alone.

    python benchmarks/bench_step_breakdown.py [--batches 1 16 64] [--ks 0 1] [--out FILE]

Qwen3-Next-80B's per-layer shapes (4 layers: 3 GDN + 1 attention, plus the MTP layer) with random
weights made on the device (`load_format="dummy"`). Per batch and k: the wall time of a decode
step through the engine (scheduling, inputs, replay, the wait for the tokens, outputs), the GPU
time of replaying the step's graph back to back (CUDA events), and what is left: host work that
the step loop does not yet overlap with the GPU. Prints JSON.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import back_to_back_replay_us, emit  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.engine.sampling_params import SamplingParams  # noqa: E402
from worker.tools.model_shapes import write_shape_config  # noqa: E402

PROMPT_LEN = 128


def decode_step_ms(engine: LLMEngine, batch: int, num_steps: int) -> float:
    """Median wall time of engine.step() once every sequence decodes."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=num_steps * 8 + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", torch.randint(0, 150000, (PROMPT_LEN,), generator=gen).tolist(), params)
    for _ in range(3):  # prefill, then the first decode steps
        engine.step()
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def replay_ms(engine: LLMEngine, batch: int, repeats: int) -> float:
    """GPU time of the last step's graph replayed back to back (its inputs left as they were)."""
    return back_to_back_replay_us(engine.worker.decode_graphs.graph_for(batch), repeats) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = write_shape_config(Path(tempfile.mkdtemp()), num_layers=4)
    rows = []
    for k in args.ks:
        engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                                        speculative_tokens=k, max_num_seqs=max(args.batches), max_model_len=1024,
                                        max_num_batched_tokens=max(2048, max(args.batches) * PROMPT_LEN),
                                        gpu_memory_utilization=0.8))
        for batch in args.batches:
            step = decode_step_ms(engine, batch, args.steps)
            gpu = replay_ms(engine, batch, 50)
            while engine.has_unfinished:  # the replays above left these sequences' states meaningless
                for seq in list(engine.scheduler.running):
                    engine.abort(seq.request_id)
                engine.step()
            rows.append(dict(k=k, batch=batch, step_ms=round(step, 3), graph_replay_ms=round(gpu, 3),
                             host_ms_not_overlapped=round(step - gpu, 3), gpu_fraction_of_step=round(gpu / step, 3)))
            print(rows[-1], file=sys.stderr)
        engine.shutdown()
        del engine
    emit(dict(benchmark="bench_step_breakdown", card=torch.cuda.get_device_name(), rows=rows), args.out)


if __name__ == "__main__":
    main()
