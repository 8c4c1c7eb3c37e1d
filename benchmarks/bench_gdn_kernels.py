"""Gated DeltaNet kernels against flash-linear-attention (fla-core) on the same inputs, printed as JSON.

    python benchmarks/bench_gdn_kernels.py [--out FILE] [--quick] [--no-sweep] [--only prefill|decode] [--profile]

Chunked prefill at 32 value heads (16 key heads) x 128 x 128, bf16, fp32 state: tokens/s for
(B, T) = (1, 4096), (1, 16384), (8, 2048). Recurrent decode (k = 0) and verify (k = 1..3) at batch
1, 16, 64, 256: state traffic in GB/s (one state read, 1+k written for ours; fla writes only the
final state) and us per call; batch 1 also replayed from a CUDA graph. The device-to-device copy
bandwidth is measured in the same run for the ratio. Needs a CUDA device; fla is optional.
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.kernels import triton_causal_conv1d as tconv  # noqa: E402
from worker.kernels import triton_gated_delta_rule as tgdn  # noqa: E402
from worker.kernels import triton_gated_delta_rule_chunked as tchunk  # noqa: E402
from worker.kernels import triton_gated_delta_rule_wy as twy  # noqa: E402

H, HV, K, V = 16, 32, 128, 128
PREFILL = [(1, 4096), (1, 16384), (8, 2048)]
BATCHES = [1, 16, 64, 256]
ROTATE = 8  # distinct state-slot sets per timed call, so small batches are not timed out of L2
# Launches of the chunked prefill tried besides the default: output in the sequential kernel or a third launch,
# V tile, warps and pipelining depth of the sequential kernel.
PREFILL_SWEEP = [dict(fused_output=f, BV=bv, num_warps=nw, num_stages=ns)
                 for f, bv, nw, ns in [(True, 32, 4, 2), (True, 32, 4, 3), (True, 64, 4, 2), (True, 64, 4, 3),
                                       (True, 64, 8, 2), (False, 16, 4, 2), (False, 16, 4, 3), (False, 32, 4, 2),
                                       (False, 32, 4, 3), (False, 64, 4, 2), (False, 64, 4, 3)]]
PREPARE_WARPS = [(4, 8), (2, 8), (8, 8), (4, 4), (2, 4)]  # (solve_warps, wy_warps) of the two parallel launches


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    parser.add_argument("--no-sweep", action="store_true", help="time only the launchers' own tile choice")
    parser.add_argument("--only", choices=["prefill", "decode"], default=None,
                        help="only the chunked prefill, or only decode / verify (with the batch-1 graphs)")
    parser.add_argument("--profile", action="store_true", help="also list each prefill's kernels (ours and fla)")
    return parser.parse_args()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_us(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth_GBps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3


def load_fla():
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as exc:  # noqa: BLE001 - any import failure means "no fla here"
        print(f"fla unavailable: {exc!r}", file=sys.stderr)
        return None
    return dict(version=getattr(fla, "__version__", "?"), chunk=chunk_gated_delta_rule,
                recurrent=fused_recurrent_gated_delta_rule)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(lead, gen):
    q = torch.randn(*lead, H, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(*lead, H, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(*lead, HV, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(*lead, HV, device="cuda", generator=gen) + 2.0)
    beta = torch.rand(*lead, HV, device="cuda", generator=gen)
    return q, k, v, g, beta


class _NoLaunch:
    """Stands in for a kernel so the rest of a launcher can be timed alone."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def sweep_name(launch: dict) -> str:
    mode = "fused" if launch["fused_output"] else "outkernel"
    return f"{mode}-BV{launch['BV']}-w{launch['num_warps']}-s{launch['num_stages']}"


def kernel_times_us(fn) -> dict:
    """CUDA time per kernel name over one call (after a warm-up), from the torch profiler."""
    try:
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return {e.key[:80]: round(e.device_time_total, 1) for e in prof.key_averages() if e.device_time_total > 0}
    except Exception as exc:  # noqa: BLE001 - a profiler problem must not end the benchmark
        return {"error": repr(exc)[:200]}


def bench_prefill(fla, sweep: bool, sizes, profile: bool = False):
    rows = []
    for B, T in sizes:
        gen = torch.Generator(device="cuda").manual_seed(B * T)
        q, k, v, g, beta = inputs((B * T,), gen)
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device="cuda")
        states = torch.randn(B, 1, HV, K, V, device="cuda", generator=gen) * 0.1
        idx = torch.arange(B, device="cuda")
        ones = torch.ones(B, dtype=torch.long, device="cuda")
        has_init = torch.ones(B, dtype=torch.bool, device="cuda")

        def ours(**tiles):
            return tgdn._chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu, states, idx, ones, has_init, K ** -0.5,
                                                    True, **tiles)

        row = dict(B=B, T=T, tokens=B * T, ours_default_us=bench_us(ours))
        # Stage split: the two parallel prepare launches alone (per warps choice), then with the sequential one.
        state, output = tchunk._chunk_state_kernel, tchunk._chunk_output_kernel
        try:
            tchunk._chunk_state_kernel, tchunk._chunk_output_kernel = _NoLaunch(), _NoLaunch()
            row["ours_prepare_only_us"] = bench_us(ours)
            row["ours_prepare_one_launch_only_us"] = bench_us(lambda: ours(split_prepare=False))
            wy = twy._chunk_wy_kernel
            try:
                twy._chunk_wy_kernel = _NoLaunch()
                row["ours_solve_only_us"] = bench_us(ours)
            finally:
                twy._chunk_wy_kernel = wy
            row["prepare_only_by_warps_us"] = {f"solve_w{sw}-wy_w{ww}": bench_us(lambda: ours(solve_warps=sw,
                                                                                                wy_warps=ww))
                                               for sw, ww in PREPARE_WARPS}
            tchunk._chunk_state_kernel = state
            row["ours_prepare_and_states_unfused_us"] = bench_us(lambda: ours(fused_output=False))
        finally:
            tchunk._chunk_state_kernel, tchunk._chunk_output_kernel = state, output
        print(json.dumps(row), file=sys.stderr)
        if sweep:
            tried = {}
            for launch in PREFILL_SWEEP:
                tried[sweep_name(launch)] = bench_us(lambda: ours(**launch))
            best_prepare = min(row["prepare_only_by_warps_us"], key=row["prepare_only_by_warps_us"].get)
            sw, ww = (int(x.split("_w")[1]) for x in best_prepare.split("-"))
            tried[f"default-{best_prepare}"] = bench_us(lambda: ours(solve_warps=sw, wy_warps=ww))
            row["sweep_us"] = tried
            row["ours_best"] = min(tried, key=tried.get)
            row["ours_best_us"] = tried[row["ours_best"]]
        best_us = min(row["ours_default_us"], row.get("ours_best_us", float("inf")))
        row["ours_Mtok_s"] = B * T / best_us
        row["ours_default_Mtok_s"] = B * T / row["ours_default_us"]
        if fla:
            fq, fk, fv = (x.view(B, T, *x.shape[1:]) for x in (q, k, v))
            fg, fb = g.view(B, T, HV), beta.view(B, T, HV)
            h0 = states[:, 0].clone()

            def theirs():
                return fla["chunk"](fq, fk, fv, fg, fb, scale=K ** -0.5, initial_state=h0, output_final_state=True,
                                    use_qk_l2norm_in_kernel=True)

            row["fla_us"] = bench_us(theirs)
            row["fla_Mtok_s"] = B * T / row["fla_us"]
            row["ratio_to_fla"] = row["ours_Mtok_s"] / row["fla_Mtok_s"]
            states_copy = states.clone()
            o_ours = tgdn._chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu, states_copy, idx, ones, has_init,
                                                      K ** -0.5, True)
            o_fla, ht = theirs()
            row["rel_diff_output_vs_fla"] = rel_err(o_ours, o_fla.view_as(o_ours))
            row["rel_diff_state_vs_fla"] = rel_err(states_copy[:, 0], ht)
            if profile:
                row["fla_kernels_us"] = kernel_times_us(theirs)
        if profile:
            row["ours_kernels_us"] = kernel_times_us(ours)
        # The conv prefill over the same tokens (conv_dim = 2*H*K + HV*V channels), for scale.
        x = torch.randn(B * T, 2 * H * K + HV * V, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(x.shape[1], 4, device="cuda", dtype=torch.bfloat16, generator=gen)
        conv_states = torch.zeros(B, x.shape[1], 3, device="cuda", dtype=torch.bfloat16)
        row["conv_prefill_us"] = bench_us(lambda: tconv.causal_conv1d_fn(x, w, cu, conv_states, idx, ones, has_init))
        rows.append(row)
        print(json.dumps({k2: v2 for k2, v2 in row.items() if k2 not in ("sweep_us", "ours_kernels_us",
                                                                           "fla_kernels_us")}), file=sys.stderr)
    return rows


def print_prefill_summary(rows) -> None:
    print("\nprefill (B, T): ours default / best (launch) / fla, M tokens/s, ratio of the default to fla")
    for r in rows:
        fla = r.get("fla_Mtok_s", float("nan"))
        print(f"  ({r['B']}, {r['T']}): {r['ours_default_Mtok_s']:.2f} / {r['ours_Mtok_s']:.2f} "
              f"({r.get('ours_best', 'default')}) / {fla:.2f}  x{r['ours_default_Mtok_s'] / fla:.2f}  "
              f"prepare {r['ours_prepare_only_us']:.0f} us (solve {r['ours_solve_only_us']:.0f})")


def bench_recurrent(fla, copy_GBps: float, sweep: bool, batches, k_specs, tiles_by_batch=None, rows=None,
                    on_row=lambda: None):
    """tiles_by_batch: {batch: launcher tiles} to time besides the default (from the k = 0 sweep).
    Rows are appended to `rows` as they come, and on_row() is called after each."""
    rows = [] if rows is None else rows
    for k_spec in k_specs:
        Q = 1 + k_spec
        for N in batches:
            gen = torch.Generator(device="cuda").manual_seed(N * 10 + Q)
            q, k, v, g, beta = inputs((N, Q), gen)
            groups = N * ROTATE
            pool = torch.randn(groups, Q, HV, K, V, device="cuda", generator=gen) * 0.1
            sets = [torch.randperm(groups, device="cuda", generator=gen)[:N] for _ in range(ROTATE)]
            accepted = torch.randint(1, Q + 1, (N,), device="cuda", generator=gen)
            turn = [0]

            def ours(**tiles):
                turn[0] += 1
                return tgdn._fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, pool, sets[turn[0] % ROTATE],
                                                                  accepted, K ** -0.5, True, **tiles)

            state_bytes = N * HV * K * V * 4
            row = dict(k=k_spec, batch=N, ours_default_us=bench_us(ours))
            if sweep and k_spec == 0:
                tried = {}
                for bv in (8, 16, 32):
                    for nw in (1, 2, 4):
                        tried[f"BV{bv}-w{nw}"] = bench_us(lambda: ours(BV=bv, num_warps=nw))
                row["sweep_us"] = tried
                row["ours_best"] = min(tried, key=tried.get)
                row["ours_best_us"] = tried[row["ours_best"]]
            elif tiles_by_batch and N in tiles_by_batch:
                bv, nw = tiles_by_batch[N]
                row["ours_best"] = f"BV{bv}-w{nw}"
                row["ours_best_us"] = bench_us(lambda: ours(BV=bv, num_warps=nw))
            ours_us = min(row["ours_default_us"], row.get("ours_best_us", float("inf")))
            row["ours_us"] = ours_us
            row["ours_state_GBps"] = state_bytes * (1 + Q) / ours_us / 1e3
            row["ours_ratio_to_copy_bw"] = row["ours_state_GBps"] / copy_GBps
            if fla:
                h0s = [torch.randn(N, HV, K, V, device="cuda", generator=gen) * 0.1 for _ in range(ROTATE)]

                def theirs():
                    turn[0] += 1
                    return fla["recurrent"](q, k, v, g, beta, scale=K ** -0.5, initial_state=h0s[turn[0] % ROTATE],
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)

                row["fla_us"] = bench_us(theirs)
                row["fla_state_GBps"] = state_bytes * 2 / row["fla_us"] / 1e3
                row["fla_ratio_to_copy_bw"] = row["fla_state_GBps"] / copy_GBps
                row["time_ratio_fla_over_ours"] = row["fla_us"] / ours_us
                row["GBps_ratio_to_fla"] = row["ours_state_GBps"] / row["fla_state_GBps"]
            rows.append(row)
            on_row()
            print(json.dumps({k2: v2 for k2, v2 in row.items() if k2 != "sweep_us"}), file=sys.stderr)
    return rows


def graph_us(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_us(graph.replay)


def bench_batch1_graph(fla):
    """us per call at batch 1, replayed from a CUDA graph (graph launch overhead included)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = {}
    for k_spec in (0, 1, 2, 3):
        Q = 1 + k_spec
        q, k, v, g, beta = inputs((1, Q), gen)
        pool = torch.randn(64, Q, HV, K, V, device="cuda", generator=gen) * 0.1
        idx, accepted = torch.tensor([5], device="cuda"), torch.tensor([Q], device="cuda")
        out[f"k{k_spec}_ours_graph_us"] = graph_us(
            lambda: tgdn.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, idx, accepted))
        # The whole decode-side GDN kernel sequence of one layer: gating, conv update, recurrence.
        x = torch.randn(1, Q, 2 * H * K + HV * V, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(x.shape[2], 4, device="cuda", dtype=torch.bfloat16, generator=gen)
        conv_states = torch.randn(64, x.shape[2], 3 + k_spec, device="cuda", dtype=torch.bfloat16, generator=gen)
        a, b = torch.randn(Q, HV, device="cuda", dtype=torch.bfloat16), torch.randn(Q, HV, device="cuda",
                                                                                   dtype=torch.bfloat16)
        A_log, dt_bias = torch.randn(HV, device="cuda"), torch.randn(HV, device="cuda")

        def layer():
            gg, bb = tgdn.gdn_gating(a, b, A_log, dt_bias)
            y = tconv.causal_conv1d_update(x, w, conv_states, idx, accepted)
            qy, ky, vy = y.split([H * K, H * K, HV * V], dim=-1)
            return tgdn.fused_recurrent_gated_delta_rule(qy.view(1, Q, H, K), ky.view(1, Q, H, K),
                                                         vy.view(1, Q, HV, V), gg.view(1, Q, HV), bb.view(1, Q, HV),
                                                         pool, idx, accepted)

        out[f"k{k_spec}_ours_layer_graph_us"] = graph_us(layer)
        if fla and k_spec == 0:
            h0 = pool[5].clone()[:1]

            def theirs():
                return fla["recurrent"](q, k, v, g, beta, scale=K ** -0.5, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)

            out["k0_fla_eager_us"] = bench_us(theirs)
            try:
                out["k0_fla_graph_us"] = graph_us(theirs)
            except Exception as exc:  # noqa: BLE001 - report, don't fail the run
                out["k0_fla_graph_error"] = repr(exc)[:200]
        out[f"k{k_spec}_ours_eager_us"] = bench_us(
            lambda: tgdn.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, idx, accepted))
    print(json.dumps(out), file=sys.stderr)
    return out


def best_tiles(result) -> dict:
    return {r["batch"]: (int(r["ours_best"].split("-")[0][2:]), int(r["ours_best"].split("-")[1][1:]))
            for r in result.get("decode", []) if "ours_best" in r}


def main():
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    fla = load_fla()
    copy_GBps = copy_bandwidth_GBps()
    print(json.dumps({"copy_bandwidth_GBps": copy_GBps}), file=sys.stderr)
    sweep = not args.no_sweep
    prefill_sizes = PREFILL[:1] if args.quick else PREFILL
    batches = [1, 256] if args.quick else BATCHES
    result = dict(
        benchmark="gdn_kernels",
        card=torch.cuda.get_device_name(),
        commit=git_commit(),
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        fla=fla["version"] if fla else None,
        shapes=dict(H=H, HV=HV, K=K, V=V, dtype="bfloat16", state_dtype="float32"),
        copy_bandwidth_GBps=copy_GBps,
    )

    def save():  # a later measurement that faults leaves the earlier ones on disk
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if args.only != "prefill":
        result["batch1_graph"] = bench_batch1_graph(fla)
        save()
    if args.only != "decode":
        result["prefill"] = bench_prefill(fla, sweep, prefill_sizes, args.profile)
        save()
    if args.only != "prefill":
        result["decode"], result["verify"] = [], []
        bench_recurrent(fla, copy_GBps, sweep, batches, [0], rows=result["decode"], on_row=save)
        bench_recurrent(fla, copy_GBps, False, batches, [1, 2, 3], best_tiles(result), rows=result["verify"],
                        on_row=save)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if "prefill" in result:
        print_prefill_summary(result["prefill"])


if __name__ == "__main__":
    main()
