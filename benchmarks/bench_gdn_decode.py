"""The Gated DeltaNet's decode step after its input projections: one launch (kernels.gdn_decode) against the
three it replaces (conv update, gated recurrence, gated norm with the out projection's e4m3 groups), at
Qwen3-Next-80B's per-rank shapes, in CUDA graphs, with the copy bandwidth of the same run.

    python benchmarks/bench_gdn_decode.py [--batches 1 16 64 256] [--ks 0 2] [--tp 1] [--out FILE]

Each timed graph runs `--layers` layers' worth of the step, each layer on its own states (as a decode step
does), so that nothing stays in L2 from one layer to the next. `state_GBps` counts the recurrent state's
bytes read and written (the traffic that matters from batch 16 up).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import card, copy_bandwidth_GBps, emit, git_commit, graph_time_us  # noqa: E402
from worker import kernels  # noqa: E402
from worker.kernels.gdn_decode import split_qkv  # noqa: E402

KEY_HEADS, VALUE_HEADS, HEAD_DIM, CONV_KERNEL, BLOCK = 16, 32, 128, 4, 128


def layer_inputs(n: int, k: int, tp: int, gen: torch.Generator) -> dict:
    h, hv = KEY_HEADS // tp, VALUE_HEADS // tp
    q_len, conv_dim = 1 + k, (2 * h + hv) * HEAD_DIM
    dev = "cuda"

    def randn(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    proj = randn(n * q_len, conv_dim + hv * HEAD_DIM)
    ba = randn(n * q_len, 2 * hv)
    return dict(mixed_qkv=proj[:, :conv_dim].view(n, q_len, conv_dim),
                z=proj[:, conv_dim:].view(n, q_len, hv, HEAD_DIM),
                a=ba[:, :hv].view(n, q_len, hv), b=ba[:, hv:].view(n, q_len, hv),
                conv_weight=randn(conv_dim, CONV_KERNEL, scale=0.5),
                conv_states=randn(n, conv_dim, CONV_KERNEL - 1 + k),
                A_log=randn(hv, dtype=torch.float32), dt_bias=randn(hv, dtype=torch.float32),
                ssm_states=randn(n, q_len, hv, HEAD_DIM, HEAD_DIM, dtype=torch.float32, scale=0.1),
                norm_weight=randn(HEAD_DIM) + 1, eps=1e-6,
                state_indices=torch.arange(n, device=dev, dtype=torch.int32),
                num_accepted=torch.randint(1, q_len + 1, (n,), generator=gen, device=dev, dtype=torch.int32))


def three_launches(x: dict):
    conv = kernels.causal_conv1d_update(x["mixed_qkv"], x["conv_weight"], x["conv_states"], x["state_indices"],
                                        x["num_accepted"])
    hv = x["ssm_states"].shape[2]
    q, k, v = split_qkv(conv, hv, HEAD_DIM, HEAD_DIM)
    core = kernels.fused_gating_recurrent_gated_delta_rule(q, k, v, x["a"], x["b"], x["A_log"], x["dt_bias"],
                                                           x["ssm_states"], x["state_indices"], x["num_accepted"])
    rows = core.shape[0] * core.shape[1]
    return kernels.gated_rms_norm(core.reshape(rows, hv, HEAD_DIM), x["z"].reshape(rows, hv, HEAD_DIM),
                                  x["norm_weight"], x["eps"], BLOCK)


def one_launch(x: dict):
    return kernels.gdn_decode(**x, quant_block=BLOCK)


def measure(n: int, k: int, tp: int, layers: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n * 10 + k)
    stack = [layer_inputs(n, k, tp, gen) for _ in range(layers)]
    row = dict(batch=n, k=k, tp=tp)
    for name, step in (("three_launches_us", three_launches), ("one_launch_us", one_launch)):
        row[name] = round(graph_time_us(lambda: [step(x) for x in stack], replays=20, inner=layers), 2)
    ssm = stack[0]["ssm_states"]
    state_bytes = n * (1 + ssm.shape[1]) * ssm[0, 0].numel() * ssm.element_size()  # one slot read, 1+k written
    row["speedup"] = round(row["three_launches_us"] / row["one_launch_us"], 3)
    row["state_GBps_one_launch"] = round(state_bytes / row["one_launch_us"] / 1e3, 1)
    row["state_GBps_three_launches"] = round(state_bytes / row["three_launches_us"] / 1e3, 1)
    del stack
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for n in args.batches:
        for k in args.ks:
            rows.append(measure(n, k, args.tp, args.layers))
            print(rows[-1], file=sys.stderr, flush=True)
    emit(dict(benchmark="bench_gdn_decode", card=card(), commit=git_commit(), copy_GBps=round(copy_bandwidth_GBps(), 1),
              layers=args.layers, rows=rows), args.out)


if __name__ == "__main__":
    main()
