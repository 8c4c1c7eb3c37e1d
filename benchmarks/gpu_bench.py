"""Measuring helpers shared by the GPU benchmarks: the card's own ceilings and graph-replay timing.

Ceilings are measured in the same process as what they judge: the device-to-device copy rate
(bytes read plus written) and a large bf16 matrix product's rate, on random data.
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_partial(result: dict, out: str | None) -> None:
    """What is measured so far, so that a run cut short keeps it."""
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


def free_engine_memory() -> None:
    """After an engine is dropped: its objects refer to one another, so only a collection frees its weights
    (80 GB at full size) before the next engine is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def card() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(name=props.name, sms=props.multi_processor_count, memory_GiB=round(props.total_memory / 2**30, 1),
                torch=torch.__version__, cuda=torch.version.cuda)


def graph_time_us(fn, replays: int = 20, inner: int = 1) -> float:
    """Median time of one call of fn (which itself makes `inner` calls), captured in a CUDA graph and
    replayed, so launch gaps stay out. fn must only launch work on the current stream."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def back_to_back_replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs per replay of a captured graph replayed back to back (its inputs left as they are), by CUDA
    events: the gaps between its kernels count, which a profiler's kernel sum leaves out."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def lone_replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> dict:
    """Median wall µs of one replay from an idle GPU, as a synchronous step meets it: the host's
    `replay()` call alone (`launch_us`), and the replay until the GPU is done (`until_done_us`). Against
    back_to_back_replay_us, what launching the graph adds when nothing hides it."""
    launch, done = [], []
    for _ in range(replays):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        launch.append((launched - start) * 1e6)
        done.append((time.perf_counter() - start) * 1e6)
    return dict(launch_us=round(statistics.median(launch), 1), until_done_us=round(statistics.median(done), 1))


def candidate_time_us(fn, inner: int, replays: int = 10) -> float | None:
    """graph_time_us for a tuning candidate, or None when it cannot run (out of shared memory and the like)."""
    try:
        return graph_time_us(fn, replays=replays, inner=inner)
    except Exception as exc:  # noqa: BLE001 - whatever stops a candidate makes it no candidate
        print(f"  skipped: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def best_of(candidates, fn, inner: int) -> tuple[float, dict]:
    """(µs, candidate) of the fastest candidate c timed as fn(c) (candidate_time_us); ones that cannot run are
    skipped."""
    timings = [(t, c) for c in candidates if (t := candidate_time_us(lambda: fn(c), inner=inner)) is not None]
    return min(timings, key=lambda p: p[0])


def copy_bandwidth_GBps(num_bytes: int = 2 << 30) -> float:
    """An eager device-to-device copy, timed with events (a copy captured in a CUDA graph measured
    2.75 TB/s on an H200 here, below what kernels reach: it is reported beside, not used)."""
    from triton.testing import do_bench

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e3
    del src, dst
    return 2 * num_bytes / us / 1e3


def gemm_TFLOPs(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = graph_time_us(lambda: a @ b, replays=10)
    return 2 * n**3 / us / 1e6


def graph_copy_GBps(num_bytes: int = 2 << 30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = graph_time_us(lambda: dst.copy_(src), replays=10)
    return 2 * num_bytes / us / 1e3


def ceilings() -> dict:
    return dict(copy_GBps=round(copy_bandwidth_GBps(), 1), graph_copy_GBps=round(graph_copy_GBps(), 1),
                bf16_gemm_TFLOPs=round(gemm_TFLOPs(), 1))


def merge_config_table(path: Path, table: dict[str, dict]) -> None:
    """Write a tuned config file (token count -> config): the token counts of `table` replace the file's,
    the others stay; ordered by token count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(table)
    path.write_text(json.dumps(dict(sorted(merged.items(), key=lambda item: int(item[0]))), indent=1) + "\n")


def write_config_tables(entries) -> None:
    """merge_config_table for (path, token count, config) entries, one write per file."""
    tables: dict[Path, dict] = {}
    for path, tokens, config in entries:
        tables.setdefault(path, {})[str(tokens)] = config
    for path, table in tables.items():
        merge_config_table(path, table)


def emit(result: dict, out: str | None) -> None:
    """Print the result's JSON (stdout) and write it to `out` when given, with the NEXTSERVE_* switches set
    (`env`: PDL, the GDN decode form, the router in the norm's launch, the fused all-reduce + norm)."""
    result.setdefault("env", {name: value for name, value in sorted(os.environ.items())
                              if name.startswith("NEXTSERVE_")})
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)
