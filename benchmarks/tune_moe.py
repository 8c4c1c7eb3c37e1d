"""Sweep the fused MoE's tile configs on this GPU and write them as data (worker/kernels/moe/configs).

    python benchmarks/tune_moe.py [--inter 512 256 128] [--out-dir DIR]

For each per-rank intermediate size (tp 1, 2, 4 of Qwen3-Next-80B: 512 routed experts + the
shared one, hidden 2048, bf16) and token count, every candidate BLOCK_M groups the pairs once;
the gate_up and down kernels are then timed per candidate tile (CUDA-graph replays over ROTATE
routing sets) and the BLOCK_M with the smallest sum of the two bests wins. Candidates that do not
compile (shared memory) are skipped. Prints the chosen configs and their times as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import (candidate_time_us, card, emit, git_commit, graph_time_us,  # noqa: E402
                                  merge_config_table)
from worker.kernels.moe import triton as tk  # noqa: E402
from worker.kernels.moe.align import moe_align_block_size  # noqa: E402
from worker.kernels.moe.tile_configs import CONFIG_DIR, config_file_name  # noqa: E402
from worker.kernels.triton_gated_delta_rule_wy import _dot_precision  # noqa: E402

E, H, TOP_K = 513, 2048, 10
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
ROTATE = 8


def gemm(bn, bk, warps, stages, group=1):
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


SMALL = [gemm(bn, bk, 4, s) for bn, bk, s in [(16, 128, 4), (32, 128, 4), (32, 256, 3), (64, 128, 4), (32, 64, 5),
                                              (64, 64, 5), (16, 256, 4), (64, 256, 3)]]
MID = [gemm(bn, bk, w, s, 4) for bn, bk, w, s in [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3),
                                                  (128, 128, 8, 3), (32, 128, 4, 4)]]
LARGE = [gemm(bn, bk, w, s, 8) for bn, bk, w, s in [(128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3),
                                                    (128, 128, 8, 3), (64, 64, 4, 4), (256, 32, 8, 4)]]


GEMV = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in [(4, 256, 2), (4, 512, 4), (8, 256, 4), (8, 512, 4),
                                                                     (16, 256, 4), (16, 128, 4), (8, 128, 2),
                                                                     (16, 512, 8), (4, 2048, 8), (2, 2048, 4),
                                                                     (8, 1024, 8), (4, 1024, 4)]]
GEMV += [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, row_acc=True) for bn, bk, w in [(2, 2048, 4), (4, 1024, 4), (4, 2048, 8),
                                                                                   (8, 512, 4), (8, 1024, 8), (2, 1024, 2),
                                                                                   (16, 256, 4), (1, 2048, 2)]]
# the down GEMV loads [next_pow2(S), BLOCK_N, BLOCK_K] tiles: all slots at once
DOWN_GEMV = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in [(1, 512, 4), (2, 512, 4), (2, 512, 8),
                                                                          (4, 256, 4), (4, 512, 8), (2, 256, 4),
                                                                          (1, 256, 2), (4, 128, 4), (8, 128, 8),
                                                                          (1, 512, 8), (2, 128, 2), (8, 64, 4)]]
PAIRS_MAX_TOKENS = 16  # the pair-by-pair GEMV path is tried up to here
PAIRS_FINALISTS = 3  # the best gate_up and down tiles (each timed alone) are then combined and timed whole


def candidates(tokens: int):
    """(BLOCK_M, tiles) to try at this token count."""
    if tokens <= 64:
        return [(16, SMALL)]
    if tokens <= 512:
        return [(bm, MID) for bm in (16, 32, 64)]
    return [(bm, LARGE) for bm in (64, 128)]


def time_kernel(launch) -> float | None:
    return candidate_time_us(launch, inner=ROTATE)


def tune_pairs(x, inter, w13, w2, routes, inter_buf) -> dict | None:
    """The decode path's (decode.py) gate_up and down GEMV tiles: each kernel's finalists timed alone,
    then every pair of finalists timed whole in each launch form: two launches, the down stage as a
    programmatic dependent launch, and one launch (overlaps that only show when the stages run together)."""
    from worker.kernels.moe import decode

    tokens, S = routes[0][1].shape
    out = torch.empty_like(x)

    def up_launch(cfg):
        return lambda: [decode._gate_up_pairs_kernel[(tokens * S, -(-inter // cfg["BLOCK_N"]))](
            x, w13, inter_buf, ids, inter, H, x.stride(0), w13.stride(0), w13.stride(1), inter_buf.stride(0),
            S=S, BN=cfg["BLOCK_N"], BK=cfg["BLOCK_K"], INTERPRET=False, PDL=False, ROW_ACC=cfg.get("row_acc", False),
            num_warps=cfg["num_warps"]) for _, ids in routes]

    def down_launch(cfg):
        return lambda: [decode._down_tokens_kernel[(tokens, -(-H // cfg["BLOCK_N"]))](
            inter_buf, w2, out, w.reshape(-1), ids, H, inter, inter_buf.stride(0), w2.stride(0), w2.stride(1),
            out.stride(0), S=S, BS=triton.next_power_of_2(S), BN=cfg["BLOCK_N"], BK=cfg["BLOCK_K"], INTERPRET=False,
            PDL=False, num_warps=cfg["num_warps"]) for w, ids in routes]

    up = sorted(((t, cfg) for cfg in GEMV if (t := time_kernel(up_launch(cfg))) is not None), key=lambda p: p[0])
    down = sorted(((t, cfg) for cfg in DOWN_GEMV if (t := time_kernel(down_launch(cfg))) is not None),
                  key=lambda p: p[0])
    if not up or not down:
        return None
    whole = []
    for _, up_cfg in up[:PAIRS_FINALISTS]:
        for _, down_cfg in down[:PAIRS_FINALISTS]:
            forms = [dict(pdl=False), dict(pdl=True)] + [dict(fused=True, num_warps=w) for w in (4, 8)]
            for form in forms:
                cfg = {"path": "pairs", **form, "gate_up": up_cfg, "down": down_cfg}
                if (t := time_kernel(whole_op(x, w13, w2, routes, cfg))) is not None:
                    whole.append((t, cfg))
    best_us, best = min(whole, key=lambda p: p[0])

    def best_of(form: str) -> float | None:
        return min((t for t, cfg in whole if form == ("fused" if cfg.get("fused") else
                                                      "pdl" if cfg.get("pdl") else "two")), default=None)

    return dict(best, us=best_us, gate_up_alone_us=up[0][0], down_alone_us=down[0][0],
                two_launches_us=best_of("two"), pdl_us=best_of("pdl"), one_launch_us=best_of("fused"))


def whole_op(x, w13, w2, routes, cfg):
    """The whole fused MoE over the routing sets, as one timed call."""
    return lambda: [tk.fused_moe(x, w13, w2, w, i, config=cfg) for w, i in routes]


def whole_us(x, w13, w2, routes, cfg) -> float:
    return graph_time_us(whole_op(x, w13, w2, routes, cfg), replays=10, inner=ROTATE)


def tune_point(tokens, inter, w13, w2, gen) -> dict:
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    routes = [tk.select_experts(torch.randn(tokens, E, device="cuda", generator=gen), TOP_K, True, shared_gate=True)
              for _ in range(ROTATE)]
    num_pairs = tokens * (TOP_K + 1)
    inter_buf = torch.randn(num_pairs, inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.empty(num_pairs, H, device="cuda", dtype=torch.bfloat16)
    dot = _dot_precision(x.dtype)
    best = None
    for bm, tiles in candidates(tokens):
        aligned = [moe_align_block_size(ids, E, bm) for _, ids in routes]
        weights = [w.reshape(-1) for w, _ in routes]
        num_blocks = aligned[0][1].shape[0]

        def up_launch(cfg):
            args = tk._gemm_args(cfg)
            return lambda: [tk._gate_up_kernel[tk._launch_grid(num_blocks, inter, args["BN"])](
                x, w13, inter_buf, s, e, n, inter, H, num_pairs, num_blocks, x.stride(0), w13.stride(0),
                w13.stride(1), inter_buf.stride(0), S=TOP_K + 1, BM=bm, DOT=dot, INTERPRET=False, **args)
                for s, e, n in aligned]

        def down_launch(cfg):
            args = tk._gemm_args(cfg)
            return lambda: [tk._down_kernel[tk._launch_grid(num_blocks, H, args["BN"])](
                inter_buf, w2, y, w, s, e, n, H, inter, num_pairs, num_blocks, inter_buf.stride(0), w2.stride(0),
                w2.stride(1), y.stride(0), BM=bm, DOT=dot, INTERPRET=False, **args)
                for (s, e, n), w in zip(aligned, weights)]

        up = [(t, cfg) for cfg in tiles if (t := time_kernel(up_launch(cfg))) is not None]
        down = [(t, cfg) for cfg in tiles if (t := time_kernel(down_launch(cfg))) is not None]
        if not up or not down:
            continue
        (up_us, up_cfg), (down_us, down_cfg) = min(up, key=lambda p: p[0]), min(down, key=lambda p: p[0])
        if best is None or up_us + down_us < best["us"]:
            best = dict(us=up_us + down_us, gate_up_us=up_us, down_us=down_us,
                        config={"BLOCK_M": bm, "gate_up": up_cfg, "down": down_cfg})
    if tokens <= PAIRS_MAX_TOKENS:  # the two paths compared whole (launches included)
        pairs = tune_pairs(x, inter, w13, w2, routes, inter_buf)
        best["grouped_us"] = whole_us(x, w13, w2, routes, best["config"])
        if pairs is not None:
            best["pairs_us"] = pairs.pop("us")
            best["pairs_timings"] = {key: pairs.pop(key) for key in list(pairs) if key.endswith("_us")}
            if best["pairs_us"] < best["grouped_us"]:
                best["config"] = pairs
    return best


def write_configs(report: dict, out_dir: Path) -> None:
    """One file per intermediate size: token count -> the chosen config. Token counts not swept this
    time keep the configs the file had."""
    device = report["card"]["name"].replace(" ", "_")
    for inter in sorted({p["inter"] for p in report["points"]}):
        merge_config_table(out_dir / config_file_name(E, H, inter, torch.bfloat16, device),
                           {str(p["tokens"]): p["config"] for p in report["points"] if p["inter"] == inter})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inter", type=int, nargs="*", default=[512, 256, 128])
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    parser.add_argument("--report", default=None, help="also write the sweep's JSON here")
    parser.add_argument("--from-report", type=Path, default=None,
                        help="write the config files from an earlier sweep's JSON (no GPU needed)")
    args = parser.parse_args()
    if args.from_report:
        write_configs(json.loads(args.from_report.read_text()), args.out_dir)
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = dict(benchmark="tune_moe", card=card(), commit=git_commit(), command=" ".join(sys.argv), points=[])
    for inter in args.inter:
        w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H**-0.5
        w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16, generator=gen) * inter**-0.5
        for tokens in args.tokens:
            best = tune_point(tokens, inter, w13, w2, gen)
            report["points"].append(dict(inter=inter, tokens=tokens, **best))
            print(json.dumps(report["points"][-1]), file=sys.stderr)
        del w13, w2
    write_configs(report, args.out_dir)
    emit(report, args.report)


if __name__ == "__main__":
    main()
