"""The fused MoE (Triton) against its torch reference and its roofline, printed as JSON.

    python benchmarks/bench_moe.py [--out FILE] [--tokens 1 4 16 ...] [--inter 512]

Qwen3-Next-80B's MoE per rank: 512 routed experts (top-10) + the shared expert as the 11th slot,
hidden 2048, intermediate 512 / tp, bf16. Times are CUDA-graph replays over ROTATE routing sets
(different experts each), so weights are not timed out of L2. For each token count:
bytes = distinct experts touched x expert bytes + activations (x read, out written), over the copy
rate measured in the same run; FLOPs = 2 x pairs x 3 x H x I over the measured bf16 GEMM rate;
roofline = the larger of the two times.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import card, ceilings, emit, git_commit, graph_time_us  # noqa: E402
from worker.kernels.moe import reference as ref  # noqa: E402
from worker.kernels.moe import triton as tk  # noqa: E402
from worker.kernels.moe.tile_configs import get_config  # noqa: E402

E, H, TOP_K = 512, 2048, 10
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
ROTATE = 8
REFERENCE_MAX_TOKENS = 4096  # the reference's per-expert loop takes seconds beyond


def routing_sets(tokens: int, gen: torch.Generator):
    sets = []
    for _ in range(ROTATE):
        logits = torch.randn(tokens, E + 1, device="cuda", generator=gen)
        sets.append(tk.select_experts(logits, TOP_K, True, shared_gate=True))
    return sets


def measure(tokens: int, inter: int, w13, w2, rates: dict, gen) -> dict:
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    sets = routing_sets(tokens, gen)
    us = graph_time_us(lambda: [tk.fused_moe(x, w13, w2, w, i) for w, i in sets], inner=ROTATE)
    distinct = sum(len(torch.unique(i)) for _, i in sets) / ROTATE
    expert_bytes = 3 * H * inter * w13.element_size()
    bytes_moved = distinct * expert_bytes + 2 * tokens * H * x.element_size()
    flops = 2 * tokens * (TOP_K + 1) * 3 * H * inter
    bytes_us = bytes_moved / rates["copy_GBps"] / 1e3
    flops_us = flops / rates["bf16_gemm_TFLOPs"] / 1e6
    row = dict(tokens=tokens, inter=inter, us=round(us, 2), distinct_experts=round(distinct, 1),
               bytes=int(bytes_moved), GBps=round(bytes_moved / us / 1e3, 1),
               fraction_of_copy=round(bytes_moved / us / 1e3 / rates["copy_GBps"], 3),
               TFLOPs=round(flops / us / 1e6, 1),
               fraction_of_gemm=round(flops / us / 1e6 / rates["bf16_gemm_TFLOPs"], 3),
               roofline_us=round(max(bytes_us, flops_us), 2), bound="bytes" if bytes_us >= flops_us else "flops",
               fraction_of_roofline=round(max(bytes_us, flops_us) / us, 3),
               config=get_config(tokens, E + 1, H, inter, x.dtype, x.device))
    if tokens <= REFERENCE_MAX_TOKENS:
        w, i = sets[0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ref.fused_moe(x, w13, w2, w, i)
        start.record()
        expected = ref.fused_moe(x, w13, w2, w, i)
        end.record()
        end.synchronize()
        ref_us = start.elapsed_time(end) * 1e3
        got = tk.fused_moe(x, w13, w2, w, i)
        row.update(reference_us=round(ref_us, 1), speedup_vs_reference=round(ref_us / us, 1),
                   rel_error_vs_reference=float((got.float() - expected.float()).norm() / expected.float().norm()))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--inter", type=int, nargs="*", default=[512], help="per-rank intermediate size(s)")
    args = parser.parse_args()
    rates = ceilings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for inter in args.inter:
        w13 = torch.randn(E + 1, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H**-0.5
        w2 = torch.randn(E + 1, H, inter, device="cuda", dtype=torch.bfloat16, generator=gen) * inter**-0.5
        for tokens in args.tokens:
            rows.append(measure(tokens, inter, w13, w2, rates, gen))
            print(json.dumps(rows[-1]), file=sys.stderr)
        del w13, w2
    result = dict(benchmark="bench_moe", card=card(), commit=git_commit(), command=" ".join(sys.argv),
                  ceilings=rates, shape=dict(experts=E, shared_experts=1, top_k=TOP_K, hidden=H, dtype="bfloat16"),
                  rows=rows)
    emit(result, args.out)


if __name__ == "__main__":
    main()
