"""Registers and spills of the batch-1 decode kernels at their tuned tiles, for Hopper, without a GPU.

    python benchmarks/kernel_registers.py [--out FILE]

Each kernel is compiled for sm_90 by Triton and its PTX assembled by the ptxas that comes with Triton
(`-v`); the JSON rows give the registers per thread and the spilled bytes. A program's registers decide
how many of its programs an SM holds at once (65,536 per SM): for a kernel that loads its weights before
its programmatic-dependent wait, that is how much of its weight is in flight before the kernel before
ends. Shapes are Qwen3-Next-80B's FP8 layers at tp 1 and the tiles those the H200 files give one token;
the one-shot all-reduce + add + norm at tp 2, 4 and 8.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.kernels import triton_gdn_decode, triton_one_shot_add_rms_norm  # noqa: E402
from worker.kernels.fp8 import triton as fp8_triton  # noqa: E402
from worker.kernels.moe import decode_fp8, tile_configs  # noqa: E402

PTXAS = Path(nvidia_compiler.__file__).parent / "bin" / "ptxas"
TARGET = GPUTarget("cuda", 90, 32)
DEVICE = "NVIDIA_H200"
BLOCK = 128
LINEAR_SHAPES = [(12288, 2048), (2048, 4096), (9216, 2048), (512, 2048), (8192, 2048)]
POINTERS = {"x": "*bf16", "x_q": "*fp8e4nv", "x_s": "*fp32", "b": "*fp8e4nv", "b_scale": "*fp32", "bias": "*bf16",
            "c": "*bf16", "dense_w": "*bf16", "dense_y": "*bf16", "inter": "*fp32", "a_q": "*fp8e4nv", "a_s": "*fp32",
            "w13": "*fp8e4nv", "w13_s": "*fp32", "w2": "*fp8e4nv", "w2_s": "*fp32", "out": "*bf16",
            "topk_weights": "*fp32", "topk_ids": "*i32"}


def ptxas_usage(kernel, constants: dict, num_warps: int, types: dict | None = None) -> dict:
    """{registers, spill_bytes} of the kernel compiled for sm_90 with these constexprs, its other arguments
    typed by `types`, else POINTERS, else int32."""
    types = {**POINTERS, **(types or {})}
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=TARGET,
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return dict(registers=registers, spill_bytes=spills, warps=num_warps,
                programs_per_sm_by_registers=65536 // (registers * 32 * num_warps))


def tuned_gemv_tile(n: int, k: int) -> dict | None:
    """The FP8 GEMV tile the H200's files give [n, k] at one token, None where that is a GEMM."""
    tile = tile_configs.tuned_entry(fp8_triton.CONFIG_DIR / fp8_triton.config_file_name(n, k, BLOCK, DEVICE), 1)
    return tile if tile is not None and tile.get("gemv") else None


def fp8_gemv_usage(k: int, tile: dict, dense_tile: dict | None = None) -> dict:
    """ptxas_usage of the FP8 GEMV at this tile (norm-fed: prequantised features), with dense rows of
    dense_tile in the launch if given (fp8.triton's merged GDN input projections)."""
    dense = dense_tile or dict(BN=1, BK=16)
    constants = dict(K=k, BLOCK=BLOCK, NB=tile["NB"], BN=tile["BN"], TP=1, HAS_BIAS=False, FP8_MAX_=448.0,
                     MIN_AMAX_=1e-12, PREQUANT=True, DENSE=dense_tile is not None, DENSE_BN=dense["BN"],
                     DENSE_BK=dense["BK"], PDL=True)
    return ptxas_usage(fp8_triton._block_fp8_gemv_kernel, constants, tile["num_warps"])


def linear_rows() -> list[dict]:
    return [dict(kernel="fp8 GEMV", n=n, k=k, tile=tile, **fp8_gemv_usage(k, tile))
            for n, k in LINEAR_SHAPES if (tile := tuned_gemv_tile(n, k)) is not None]


def moe_rows() -> list[dict]:
    path = tile_configs.CONFIG_DIR / tile_configs.config_file_name(513, 2048, 512, fp8_triton.FP8_DTYPE, DEVICE)
    cfg = tile_configs.tuned_entry(path, 1)
    up, down = cfg["gate_up"], cfg["down"]
    gate_up = dict(K=2048, S=11, BLOCK=BLOCK, NB=up["NB"], BN=min(up["BLOCK_N"], BLOCK), FP8_MAX_=448.0,
                   MIN_AMAX_=1e-12, PREQUANT=True, PDL=True, DOWN_PDL=True)
    down_constants = dict(K=512, S=11, BS=16, BLOCK=BLOCK, BN=down["BLOCK_N"], NB=down["NB"], FP8_MAX_=448.0,
                          MIN_AMAX_=1e-12, PREQUANT=True, PDL=True)
    rows = [dict(kernel="fp8 MoE gate_up (pairs)", tile=up,
                 **ptxas_usage(decode_fp8._gate_up_fp8_pairs_kernel, gate_up, up["num_warps"])),
            dict(kernel="fp8 MoE down (pairs)", tile=down,
                 **ptxas_usage(decode_fp8._down_fp8_tokens_kernel, down_constants, down["num_warps"]))]
    for bn in (4, 8):  # the packed down stage, a candidate of tune_fp8
        packed = dict(K=512, S=11, BLOCK=BLOCK, BN=bn, PDL=True)
        rows.append(dict(kernel="fp8 MoE down (packed)", tile=dict(BLOCK_N=bn, num_warps=4, packed=True),
                         **ptxas_usage(decode_fp8._down_fp8_packed_kernel, packed, 4)))
    return rows


GDN_DECODE_TYPES = {"x": "*bf16", "z": "*bf16", "a": "*bf16", "b": "*bf16", "conv_w": "*bf16",
                    "conv_states": "*bf16", "A_log": "*fp32", "dt_bias": "*fp32", "ssm_states": "*fp32",
                    "norm_w": "*bf16", "state_indices": "*i32", "num_accepted": "*i32", "out": "*bf16",
                    "x_q": "*fp8e4nv", "x_scale": "*fp32", "scale": "fp32", "eps": "fp32", "xc": "*bf16"}


def gdn_decode_rows() -> list[dict]:
    """The GDN decode step's kernel (triton_gdn_decode) in its one- and two-launch forms, 1 and 3 tokens a
    sequence, at the 80B's heads (16 key heads, 32 value heads of 128), writing e4m3 groups of 128."""
    rows = []
    for form in ("one", "two"):
        for q in (1, 3):
            constants = dict(Q=q, K=128, V=128, RATIO=2, KW=4, W=3 + q - 1, BQ=triton.next_power_of_2(q), BK=128,
                             BV=128, BW=triton.next_power_of_2(3 + q - 1), CONV=form == "one",
                             HEADS=2 if form == "one" else 1, G=BLOCK, QUANT=True, FP8_MAX_=448.0, MIN_AMAX_=1e-12,
                             PDL=True)
            usage = ptxas_usage(triton_gdn_decode._gdn_decode_kernel, constants, triton_gdn_decode._num_warps(128, 128),
                                GDN_DECODE_TYPES)
            rows.append(dict(kernel=f"GDN decode ({form})", tokens_per_sequence=q, **usage))
    return rows


ONE_SHOT_NORM_TYPES = {"row_ptrs": "*i64", "flag_ptrs": "*i64", "calls": "*i32", "residual": "*bf16",
                       "weight": "*bf16", "new_residual": "*bf16", "x_scale": "*fp32", "eps": "fp32"}


def one_shot_norm_rows() -> list[dict]:
    """The one-shot all-reduce + add + norm (triton_one_shot_add_rms_norm) at hidden 2048 in bf16, with the
    e4m3 groups of 128, at tp 2, 4 and 8."""
    rows = []
    for world in (2, 4, 8):
        constants = dict(WORLD=world, WP=world, BH=2048, G=BLOCK, QUANT=True, FP8_MAX_=448.0, MIN_AMAX_=1e-12,
                         PDL=True)
        usage = ptxas_usage(triton_one_shot_add_rms_norm._one_shot_add_rms_norm_kernel, constants, 8,
                            ONE_SHOT_NORM_TYPES)
        rows.append(dict(kernel="one-shot all-reduce + add + norm", tp=world, **usage))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = linear_rows() + moe_rows() + gdn_decode_rows() + one_shot_norm_rows()
    report = dict(benchmark="kernel_registers", target="sm_90a", tiles_of=DEVICE, rows=rows)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
