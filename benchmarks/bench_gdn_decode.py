"""The Gated DeltaNet's decode step after its input projections in each form of triton_gdn_decode: one launch,
two (the conv kernel, then one program per value head), and the three it replaces (conv update, gated
recurrence, gated norm), all writing the out projection's e4m3 groups, at Qwen3-Next-80B's per-rank shapes,
in CUDA graphs, with the copy bandwidth of the same run.

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
from worker.kernels.triton_gdn_decode import FORMS, gdn_decode_as  # noqa: E402

KEY_HEADS, VALUE_HEADS, HEAD_DIM, CONV_KERNEL, BLOCK = 16, 32, 128, 4, 128


def layer_inputs(n: int, k: int, tp: int, gen: torch.Generator, dev="cuda", act=torch.bfloat16) -> dict:
    h, hv = KEY_HEADS // tp, VALUE_HEADS // tp
    q_len, conv_dim = 1 + k, (2 * h + hv) * HEAD_DIM

    def randn(*shape, dtype=act, scale=1.0):
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


def measure(n: int, k: int, tp: int, layers: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n * 10 + k)
    stack = [layer_inputs(n, k, tp, gen) for _ in range(layers)]
    row = dict(batch=n, k=k, tp=tp)
    ssm = stack[0]["ssm_states"]
    state_bytes = n * (1 + ssm.shape[1]) * ssm[0, 0].numel() * ssm.element_size()  # one slot read, 1+k written
    for form in FORMS:
        us = graph_time_us(lambda: [gdn_decode_as(form, **x, quant_block=BLOCK) for x in stack], replays=20,
                           inner=layers)
        row[f"{form}_us"] = round(us, 2)
        row[f"{form}_state_GBps"] = round(state_bytes / us / 1e3, 1)
    stack.clear()
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
