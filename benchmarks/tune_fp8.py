"""Sweep the FP8 kernels' tiles on this GPU and write them as data: the block-scaled linear
(worker/kernels/fp8/configs, GEMV or GEMM per token count) and the FP8 fused MoE
(worker/kernels/moe/configs, dtype=float8_e4m3fn: the decode path or the grouped kernels).

    python benchmarks/tune_fp8.py [--tokens 1 2 4 ...] [--only linear|moe] [--tp N] [--report FILE]

Shapes are Qwen3-Next-80B's FP8 layers (128 x 128 blocks) as one rank of tensor parallel size --tp holds
them (1 by default; read off the model built on the meta device, so they are the shards the model
makes): GDN in_proj_qkvz and out_proj, attention q (with its gate), k/v, q+k+v (the one GEMM the layer
runs once loaded) and o projections; the MoE with 512 routed experts + the shared one, hidden 2048,
intermediate 512 / tp. One GPU tunes any tp: a rank's kernels see only its shard. Every candidate is
timed as CUDA-graph replays over ROTATE weight or routing sets (so L2 does not hold them); the
fastest wins. Inputs that come from a norm in the model come with their e4m3 groups, as the norm writes
them (NORM_FED, and the MoE's), so the GEMV's own quantisation and its "prequant" are not timed there. Candidates that do not compile
are skipped. Existing files keep the token counts not swept.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import best_of, card, emit, git_commit, write_config_tables  # noqa: E402
from worker.kernels.fp8 import triton as fp8_triton  # noqa: E402
from worker.kernels.fp8.quant import FP8_DTYPE, quantize_block_fp8  # noqa: E402
from worker.kernels.moe import tile_configs  # noqa: E402
from worker.kernels.moe import triton as moe_triton  # noqa: E402
from worker.kernels.moe import triton_fp8  # noqa: E402
from worker.tools.model_shapes import write_shape_config  # noqa: E402

BLOCK = 128
LINEAR_LAYERS = ["gdn.in_proj_qkvz", "gdn.out_proj", "attn.q_proj", "attn.k_proj", "attn.qkv_proj", "attn.o_proj"]
E, H, TOP_K = 513, 2048, 10
TOKENS = [1, 2, 3, 4, 8, 16, 32, 64, 128, 256]
ROTATE = 4
GEMV_MAX = 16  # GEMV candidates are tried up to here
ALL_TOKENS_MAX = 8  # and those with one program for all tokens ("all_tokens") up to here

GEMV = [dict(gemv=True, BN=bn, NB=nb, num_warps=w, prequant=pq) for bn, nb, w in [
    (2, 4, 2), (4, 2, 4), (4, 4, 4), (8, 2, 4), (8, 4, 4), (8, 4, 8), (16, 2, 4), (16, 4, 8), (4, 8, 4),
    (2, 8, 4), (8, 8, 8), (16, 1, 4), (32, 2, 8), (32, 4, 8), (64, 2, 8),
    # a program's whole K in its first tile, loaded before the PDL wait (the weights do not depend on it)
    (1, 16, 2), (1, 16, 4), (2, 16, 4), (4, 16, 8), (8, 16, 8), (1, 32, 4), (2, 32, 4), (2, 32, 8), (4, 32, 8)]
    for pq in (False, True)]  # the features quantised by each program, or by one launch before the GEMV
# Layers whose input comes from a norm that writes its e4m3 groups (RMSNorm.quant_block): they read those.
NORM_FED = {"gdn.in_proj_qkvz", "gdn.out_proj", "attn.q_proj", "attn.k_proj", "attn.qkv_proj"}
GEMM = [dict(BM=bm, BN=bn, GROUP_M=g, num_warps=w, num_stages=s) for bm, bn, g, w, s in [
    (16, 64, 1, 4, 4), (16, 128, 1, 4, 4), (16, 32, 1, 4, 5), (32, 64, 4, 4, 4), (32, 128, 4, 4, 4),
    (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (64, 128, 8, 8, 3), (128, 128, 8, 8, 3)]]
MOE_PAIRS = [{"path": "pairs", "gate_up": dict(BLOCK_N=up_n, NB=nb, num_warps=uw, prequant=pq),
              "down": dict(BLOCK_N=dn, NB=dnb, num_warps=dw, prequant=dpq)}
             for up_n, nb, uw in [(4, 4, 4), (8, 2, 4), (16, 2, 4), (1, 16, 2), (1, 8, 2), (2, 16, 4), (2, 8, 2),
                                  (1, 16, 4)]
             for pq in (False, True)  # the activations quantised in gate_up, or by one launch before it
             # NB 4: the whole intermediate size (512) in the first tile, loaded before the PDL wait
             for dn, dw, dnb in [(4, 4, 1), (8, 8, 1), (16, 8, 1), (2, 2, 1), (2, 4, 4), (4, 4, 4), (4, 8, 4), (8, 8, 4)]
             for dpq in (False, True) if pq or not dpq]  # the same for down's inputs (only beside gate_up's)
# The packed down stage (weights held as 32-bit words, slots summed one by one; reads prequantised rows).
MOE_PAIRS += [{"path": "pairs", "gate_up": dict(BLOCK_N=up_n, NB=nb, num_warps=uw, prequant=True),
               "down": dict(BLOCK_N=dn, NB=4, num_warps=dw, prequant=True, packed=True)}
              for up_n, nb, uw in [(2, 16, 4), (1, 16, 4), (2, 8, 2)] for dn, dw in [(2, 4), (4, 4), (8, 4), (8, 8)]]
MOE_GROUPED = [{"BLOCK_M": bm, "gate_up": dict(GROUP_M=g, num_warps=w, num_stages=s),
                "down": dict(BLOCK_N=dn, GROUP_M=g, num_warps=w, num_stages=s)}
               for bm, g in [(16, 1), (32, 4), (64, 8)] for dn in (64, 128) for w, s in [(4, 3), (4, 4), (8, 3)]]
MOE_PAIRS_MAX = 8


def rank_shapes(tp: int) -> tuple[dict[str, tuple[int, int]], int]:
    """(layer -> its [N, K] on one rank, the MoE's intermediate size on one rank) of the FP8 80B model at
    tensor parallel size tp: the model built on the meta device with that size (its shard checks refuse
    a tp that would split an FP8 block, naming the layer)."""
    from worker.config import ModelConfig
    from worker.distributed import set_tp
    from worker.model.qwen3_next import Qwen3NextForCausalLM

    config = ModelConfig.from_pretrained(write_shape_config(Path(tempfile.mkdtemp()), num_layers=4, quantize="fp8"))
    set_tp(0, tp)
    try:
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(config)
    finally:
        set_tp(0, 1)
    layers = model.model.layers
    gdn = next(layer.linear_attn for layer in layers if layer.layer_type == "linear_attention")
    attn = next(layer.self_attn for layer in layers if layer.layer_type == "full_attention")
    shape = lambda linear: tuple(linear.weight.shape)  # noqa: E731
    q, k, v = shape(attn.q_proj), shape(attn.k_proj), shape(attn.v_proj)
    shapes = {"gdn.in_proj_qkvz": shape(gdn.in_proj_qkvz), "gdn.out_proj": shape(gdn.out_proj), "attn.q_proj": q,
              "attn.k_proj": k, "attn.qkv_proj": (q[0] + k[0] + v[0], q[1]), "attn.o_proj": shape(attn.o_proj)}
    return shapes, layers[0].mlp.experts.inter


def tune_linear(tokens: list[int], gen, layers: list[str], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    points = []
    for name in layers:
        n, k = shapes[name]
        layers = [quantize_block_fp8(torch.randn(n, k, device="cuda", generator=gen) * k**-0.5, BLOCK)
                  for _ in range(ROTATE)]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            groups = fp8_triton.per_token_group_quant_fp8(x, BLOCK) if name in NORM_FED else None
            gemv = [c for c in GEMV if c["NB"] * BLOCK <= max(k, BLOCK) and (groups is None or not c["prequant"])]
            if 1 < m <= ALL_TOKENS_MAX:  # also each tile with one program for every token of its rows
                gemv += [dict(c, all_tokens=True) for c in gemv]
            candidates = (gemv if m <= GEMV_MAX else []) + GEMM
            us, tile = best_of(candidates, lambda c: [
                fp8_triton.w8a8_block_fp8_linear(x, w, s, BLOCK, tile=c, x_groups=groups) for w, s in layers], ROTATE)
            weight_bytes = n * k
            points.append(dict(layer=name, n=n, k=k, tokens=m, us=round(us, 2), tile=tile,
                               weight_GBps=round(weight_bytes / us / 1e3, 1)))
            print(json.dumps(points[-1]), file=sys.stderr)
        del layers
    return points


def tune_moe(tokens: list[int], gen, inter: int) -> list[dict]:
    w13, w13_s = quantize_block_fp8(torch.randn(E, 2 * inter, H, device="cuda", generator=gen) * H**-0.5, BLOCK)
    w2, w2_s = quantize_block_fp8(torch.randn(E, H, inter, device="cuda", generator=gen) * inter**-0.5, BLOCK)
    points = []
    for m in tokens:
        x = torch.randn(m, H, device="cuda", generator=gen).to(torch.bfloat16)
        routes = [moe_triton.select_experts(torch.randn(m, E, device="cuda", generator=gen), TOP_K, True,
                                            shared_gate=True) for _ in range(ROTATE)]

        groups = fp8_triton.per_token_group_quant_fp8(x, BLOCK)  # from the norm before the MoE (RMSNorm.quant_block)

        def run(cfg):
            return [triton_fp8.fused_moe_fp8(x, w13, w2, w13_s, w2_s, w, i, BLOCK, config=cfg, x_groups=groups)
                    for w, i in routes]

        pairs = [c for c in MOE_PAIRS if c["gate_up"]["prequant"]]  # the groups are given: the same kernels
        candidates = (pairs if m <= MOE_PAIRS_MAX else []) + MOE_GROUPED
        us, cfg = best_of(candidates, run, ROTATE)
        points.append(dict(tokens=m, inter=inter, us=round(us, 2), config=cfg))
        print(json.dumps(points[-1]), file=sys.stderr)
    return points


def write(report: dict) -> None:
    device = report["card"]["name"].replace(" ", "_")
    write_config_tables(
        [(fp8_triton.CONFIG_DIR / fp8_triton.config_file_name(p["n"], p["k"], BLOCK, device), p["tokens"], p["tile"])
         for p in report.get("linear", [])]
        + [(tile_configs.CONFIG_DIR / tile_configs.config_file_name(E, H, p.get("inter", 512), FP8_DTYPE, device),
            p["tokens"], p["config"]) for p in report.get("moe", [])])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--only", choices=["linear", "moe"], default=None)
    parser.add_argument("--layers", nargs="*", default=None, choices=sorted(LINEAR_LAYERS),
                        help="linear shapes to sweep (default: all)")
    parser.add_argument("--tp", type=int, default=1, help="tune the shards one rank of this tensor parallel size holds")
    parser.add_argument("--report", default=None, help="also write the sweep's JSON here")
    parser.add_argument("--from-report", type=Path, default=None, help="write the configs from an earlier report")
    args = parser.parse_args()
    if args.from_report:
        write(json.loads(args.from_report.read_text()))
        return
    shapes, inter = rank_shapes(args.tp)
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = dict(benchmark="tune_fp8", card=card(), commit=git_commit(), command=" ".join(sys.argv), tp=args.tp)
    if args.only in (None, "linear"):
        report["linear"] = tune_linear(args.tokens, gen, args.layers or LINEAR_LAYERS, shapes)
    if args.only in (None, "moe"):
        report["moe"] = tune_moe(args.tokens, gen, inter)
    write(report)
    emit(report, args.report)


if __name__ == "__main__":
    main()
