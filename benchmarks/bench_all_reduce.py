"""All-reduce latency at tp 2, 2 KB to 1 MB: the one-shot over peer memory against NCCL, eagerly and
replayed from CUDA graphs, printed as JSON.

    python benchmarks/bench_all_reduce.py [--out FILE] [--sizes-kb 2 4 ... 1024] [--dtype bfloat16]

Needs two GPUs of one host and refuses to run with fewer. It starts two ranks (one process each,
NCCL plus a gloo control group as the engine's worker group has, NVLink multicast off) and measures,
per message size on rank 0:
- nccl: torch.distributed's all-reduce (NCCL);
- one_shot: worker.parallel.all_reduce.OneShotAllReduce with a buffer as large as the largest size, so
  it is measured past the 64 KB where the engine switches to NCCL (`engine_path` says which the
  engine takes);
eager: the mean of `--iters` calls back to back, launch overhead included (median of 5 runs); graph:
`--iters` calls captured in one CUDA graph, the median replay over `--iters`. Messages are zeros, so
repeated in-place sums stay finite; `bitwise_equal` compares one reduction of random data by both.

`norm_rows`: the all-reduce + residual add + RMSNorm after each row-parallel layer, for `--norm-tokens`
rows of `--hidden` features: NCCL then the add + norm kernel, the one-shot then the add + norm (three
launches), and the one-shot kernel that adds and normalises itself (NEXTSERVE_ONE_SHOT_NORM's path,
one launch), with `fused_bitwise_equal` comparing its result with the unfused one-shot's.

`gather_rows`: the lm_head's all-gather of each rank's vocabulary slice of the logits (`--vocab` columns
over the ranks, `--gather-tokens` rows), as the engine does it (TensorParallel.all_gather_last_dim: NCCL,
then a concatenation), to tell whether a one-shot all-gather over peer memory would be worth building.

Not run yet: written without a 2-GPU machine (none was lent); the first run on one will tell.
"""

import argparse
import os
import pickle
import queue
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import card, emit, git_commit, graph_time_us  # noqa: E402
from worker.launcher import free_port  # noqa: E402
from worker.parallel.all_reduce import MAX_ONE_SHOT_BYTES, fits_one_shot, forbid_multicast  # noqa: E402

SIZE = 2
SIZES_KB = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
EAGER_RUNS = 5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=SIZES_KB)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=100, help="all-reduces per eager run and per graph")
    parser.add_argument("--hidden", type=int, default=2048, help="features of a row in norm_rows")
    parser.add_argument("--norm-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--vocab", type=int, default=151936, help="logits columns over all ranks in gather_rows")
    parser.add_argument("--gather-tokens", type=int, nargs="+", default=[1, 3, 16])
    return parser.parse_args()


def eager_time_us(fn, iters: int) -> float:
    import torch.distributed as dist

    times = []
    for _ in range(EAGER_RUNS):
        dist.barrier()  # both ranks start together
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def norm_row(nccl, one_shot, tokens: int, args, rank: int, device) -> dict:
    """One norm_rows entry: each path timed on zero rows (in-place sums stay zero, no copy is timed), and
    the fused result of random rows compared with the unfused one-shot's."""
    dtype = getattr(torch, args.dtype)
    shape = (tokens, args.hidden)
    x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(100 + rank), device=device).to(dtype)
    residual = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    weight, zeros = torch.zeros(args.hidden, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def call(reducer, fused, rows=zeros):
        one_shot.fuse_norm = fused
        return reducer.all_reduce_add_rms_norm(rows, residual, weight, 1e-6)

    pairs = zip(call(one_shot, True, x), call(one_shot, False, x.clone()))
    row = dict(tokens=tokens, hidden=args.hidden, fused_bitwise_equal=all(torch.equal(a, b) for a, b in pairs))
    paths = {"nccl_then_norm": (nccl, False), "one_shot_then_norm": (one_shot, False),
             "one_shot_fused": (one_shot, True)}
    for name, (reducer, fused) in paths.items():
        def many(r=reducer, f=fused):
            for _ in range(args.iters):
                call(r, f)

        row[f"{name}_graph_us"] = round(graph_time_us(many, inner=args.iters), 2)
        row[f"{name}_eager_us"] = round(eager_time_us(lambda r=reducer, f=fused: call(r, f), args.iters), 2)
    one_shot.fuse_norm = False
    row["fused_speedup_over_one_shot"] = round(row["one_shot_then_norm_graph_us"] / row["one_shot_fused_graph_us"], 2)
    return row


def gather_row(rank: int, tokens: int, args, device) -> dict:
    from worker.distributed import TensorParallel

    tp = TensorParallel(rank, SIZE)
    logits = torch.zeros(tokens, args.vocab // SIZE, dtype=getattr(torch, args.dtype), device=device)

    def many():
        for _ in range(args.iters):
            tp.all_gather_last_dim(logits)

    return dict(tokens=tokens, bytes_per_rank=logits.numel() * logits.element_size(),
                nccl_graph_us=round(graph_time_us(many, inner=args.iters), 2),
                nccl_eager_us=round(eager_time_us(lambda: tp.all_gather_last_dim(logits), args.iters), 2))


def _rank(rank: int, port: int, args, results) -> None:
    import torch.distributed as dist

    from worker.parallel.all_reduce import GroupAllReduce, OneShotAllReduce, choose_all_reduce

    forbid_multicast()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE,
                            device_id=device)
    control = dist.new_group(backend="gloo")
    dtype = getattr(torch, args.dtype)
    max_bytes = max(args.sizes_kb) << 10
    nccl = GroupAllReduce(dist.group.WORLD)
    one_shot = OneShotAllReduce(dist.group.WORLD, device, max_bytes=max_bytes)
    engine = choose_all_reduce(dist.group.WORLD, device, control)
    result = dict(one_shot_self_test=one_shot.self_test() or "ok", engine_all_reduce=engine.describe(), rows=[])
    for size_kb in args.sizes_kb:
        numel = (size_kb << 10) // dtype.itemsize
        zeros = torch.zeros(numel, dtype=dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(rank)
        data = torch.randn(numel, generator=gen, device=device).to(dtype)
        row = dict(size_bytes=size_kb << 10, numel=numel,
                   engine_path="one_shot" if fits_one_shot(zeros, MAX_ONE_SHOT_BYTES) else "nccl",
                   bitwise_equal=bool(torch.equal(one_shot.all_reduce(data.clone()), nccl.all_reduce(data.clone()))))
        for name, reducer in (("nccl", nccl), ("one_shot", one_shot)):
            def once(r=reducer, x=zeros):
                r.all_reduce(x)

            def many(r=reducer, x=zeros):
                for _ in range(args.iters):
                    r.all_reduce(x)

            row[f"{name}_eager_us"] = round(eager_time_us(once, args.iters), 2)
            row[f"{name}_graph_us"] = round(graph_time_us(many, inner=args.iters), 2)
        row["graph_speedup"] = round(row["nccl_graph_us"] / row["one_shot_graph_us"], 2)
        row["eager_speedup"] = round(row["nccl_eager_us"] / row["one_shot_eager_us"], 2)
        result["rows"].append(row)
    result["norm_rows"] = [norm_row(nccl, one_shot, tokens, args, rank, device) for tokens in args.norm_tokens]
    result["gather_rows"] = [gather_row(rank, tokens, args, device) for tokens in args.gather_tokens]
    if rank == 0:
        result["card"] = card()
        results.put(pickle.dumps(result))
    dist.barrier(group=control)
    dist.destroy_process_group()


def main():
    args = parse_args()
    visible = torch.cuda.device_count()
    if visible < SIZE:
        sys.exit(f"bench_all_reduce.py needs {SIZE} GPUs of one host (tp 2); {visible} visible")
    forbid_multicast()  # inherited by the ranks, which set it again before NCCL starts
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    ranks = [context.Process(target=_rank, args=(r, port, args, results)) for r in range(SIZE)]
    for p in ranks:
        p.start()
    while True:
        try:
            result = pickle.loads(results.get(timeout=5))
            break
        except queue.Empty:
            failed = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(ranks) if p.exitcode]
            if failed:
                sys.exit("bench_all_reduce.py: " + "; ".join(failed))
    for p in ranks:
        p.join(60)
    result.update(commit=git_commit(), command=" ".join([Path(sys.executable).name, *sys.argv]), tp=SIZE,
                  dtype=args.dtype, iters=args.iters, env={k: os.environ[k] for k in sorted(os.environ)
                                                           if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))})
    emit(result, args.out)


if __name__ == "__main__":
    main()
