"""Sweep the dense GEMV's tiles against cuBLAS (F.linear) on this GPU and write the winners as data
(worker/kernels/linear_configs: a token count -> a GEMV tile, or {"cublas": true} where cuBLAS wins).

    python benchmarks/tune_linear.py [--tokens 1 2 4 8] [--shapes gdn.in_proj ...] [--tp 1] [--report FILE]

Shapes are Qwen3-Next-80B's unquantised linear layers at one to a few tokens, this rank's slice at
`--tp`: the GDN's merged in_proj (qkvz + ba) and out_proj, attention's merged q+k+v and o_proj, the
router (512 experts + the shared gate), the MTP fc, the FP8 release's bf16 in_proj_ba and the
lm_head. Each candidate and cuBLAS are timed as CUDA-graph replays over ROTATE weights (so L2 does
not hold them); the fastest wins. Existing files keep the token counts not swept.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import best_of, candidate_time_us, card, emit, git_commit, write_config_tables  # noqa: E402
from worker.kernels import triton_linear  # noqa: E402

# name -> (N, K, which of the two is split at tp > 1: "n" column-parallel, "k" row-parallel, None replicated)
SHAPES = {"gdn.in_proj": (12352, 2048, "n"), "gdn.out_proj": (2048, 4096, "k"), "attn.qkv_proj": (9216, 2048, "n"),
          "attn.o_proj": (2048, 4096, "k"), "router": (513, 2048, None), "mtp.fc": (2048, 4096, None),
          "gdn.in_proj_ba": (64, 2048, "n"), "lm_head": (151936, 2048, "n")}
TOKENS = [1, 2, 4, 8]
ROTATE = 4
TILES = [dict(BN=bn, BK=bk, num_warps=w, num_stages=s) for bn, bk, w, s in [
    (1, 1024, 2, 2), (1, 2048, 2, 1), (1, 2048, 4, 1), (2, 1024, 2, 2), (2, 1024, 4, 2), (2, 2048, 4, 1),
    (4, 512, 4, 2), (4, 512, 4, 3), (4, 1024, 4, 2), (8, 256, 4, 3), (8, 512, 4, 2), (8, 512, 8, 2),
    (16, 256, 8, 2), (16, 128, 4, 3),
    # a program's whole K in its first tile, loaded before the PDL wait (the weights do not depend on it)
    (1, 4096, 4, 1), (1, 4096, 8, 1), (2, 4096, 8, 1)]]


def sweep(name: str, n: int, k: int, tokens: list[int], dtype: torch.dtype, gen) -> list[dict]:
    weights = [torch.randn(n, k, device="cuda", generator=gen).to(dtype) * k**-0.5 for _ in range(ROTATE)]
    points = []
    for m in tokens:
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        cublas_us = candidate_time_us(lambda: [F.linear(x, w) for w in weights], inner=ROTATE)
        gemv_us, tile = best_of([tile for tile in TILES if tile["BK"] <= max(k, 128)],
                                lambda tile: [triton_linear.gemv(x, w, None, tile) for w in weights], ROTATE)
        best = tile if gemv_us < cublas_us else {"cublas": True}
        weight_bytes = n * k * weights[0].element_size()
        points.append(dict(layer=name, n=n, k=k, dtype=str(dtype).removeprefix("torch."), tokens=m,
                           cublas_us=round(cublas_us, 2), gemv_us=round(gemv_us, 2), gemv_tile=tile, chosen=best,
                           weight_GBps=round(weight_bytes / min(gemv_us, cublas_us) / 1e3, 1)))
        print(json.dumps(points[-1]), file=sys.stderr)
    del weights
    return points


def write(report: dict) -> None:
    device = report["card"]["name"].replace(" ", "_")
    write_config_tables(
        (triton_linear.CONFIG_DIR / triton_linear.config_file_name(p["n"], p["k"], getattr(torch, p["dtype"]), device),
         p["tokens"], p["chosen"]) for p in report["points"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--report", default=None, help="also write the sweep's JSON here")
    parser.add_argument("--from-report", type=Path, default=None, help="write the configs from an earlier report")
    args = parser.parse_args()
    if args.from_report:
        write(json.loads(args.from_report.read_text()))
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = dict(benchmark="tune_linear", card=card(), commit=git_commit(), command=" ".join(sys.argv), points=[])
    swept = set()
    for name in args.shapes or list(SHAPES):
        n, k, split = SHAPES[name]
        n, k = (n // args.tp, k) if split == "n" else (n, k // args.tp) if split == "k" else (n, k)
        if (n, k) not in swept:  # out_proj, o_proj and mtp.fc share a shape
            swept.add((n, k))
            report["points"] += sweep(name, n, k, args.tokens, getattr(torch, args.dtype), gen)
    write(report)
    emit(report, args.report)


if __name__ == "__main__":
    main()
