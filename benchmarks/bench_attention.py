"""Paged attention (Triton) against torch's scaled_dot_product_attention (flash backend) on the same
data laid out contiguously, printed as JSON.

    python benchmarks/bench_attention.py [--out FILE]

Qwen3-Next's attention per rank at tp 1: 16 query heads, 2 KV heads, head dim 256, bf16, block
size 16, shuffled block tables. Decode (one query per sequence) at batch 1..256 with contexts of
1k, 8k and 32k tokens (skipped where the caches would pass MAX_KV_GB), and one 4k-token causal
prefill. Both sides are timed as CUDA-graph replays; decode also reports the KV bytes read over the
copy rate measured in the same run.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import card, ceilings, emit, git_commit, graph_time_us  # noqa: E402
from worker.kernels import triton_paged_attention as tk  # noqa: E402

H, HKV, D, BLOCK = 16, 2, 256, 16
BATCHES = [1, 4, 16, 64, 256]
CONTEXTS = [1024, 8192, 32768]
MAX_KV_GB = 8.0
DTYPE = torch.bfloat16
# --sweep: launch shapes tried against the default on a few cases, (BN keys, warps, stages, split factor).
SWEEP = [(32, 8, 3, 1), (32, 4, 3, 1), (64, 4, 2, 1), (64, 8, 2, 1), (64, 8, 3, 1), (16, 4, 4, 1), (32, 4, 4, 1),
         (128, 8, 2, 1), (32, 8, 3, 2), (64, 8, 2, 2), (32, 8, 3, 4)]
SWEEP_CASES = [(1, 32768), (4, 8192), (16, 8192), (64, 1024), (256, 1024), (256, 8192)]


def paged_case(batch: int, context: int, q_len: int, gen):
    """Contiguous k, v [B, HKV, L, D] and the same data in a shuffled paged cache."""
    blocks_per_seq = math.ceil(context / BLOCK)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(batch, HKV, context, D, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(batch, HKV, context, D, device="cuda", dtype=DTYPE, generator=gen)
    order = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = order.view(batch, blocks_per_seq).to(torch.int32)
    k_cache = torch.empty(num_blocks, BLOCK, HKV, D, device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    padded = blocks_per_seq * BLOCK
    for src, dst in ((k, k_cache), (v, v_cache)):
        full = F.pad(src, (0, 0, 0, padded - context)).view(batch, HKV, blocks_per_seq, BLOCK, D)
        dst[tables.long().view(-1)] = full.permute(0, 2, 3, 1, 4).reshape(-1, BLOCK, HKV, D)
    q = torch.randn(batch * q_len, H, D, device="cuda", dtype=DTYPE, generator=gen)
    meta = dict(cu_seqlens_q=torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32),
                context_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
                block_tables=tables, scale=D**-0.5, max_context_len=context)
    return q, k, v, k_cache, v_cache, meta


def sdpa(q, k, v, batch, q_len, causal):
    qs = q.view(batch, q_len, H, D).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(qs, k, v, is_causal=causal, enable_gqa=True)


def compare(q, k, v, k_cache, v_cache, meta, batch, q_len, causal):
    ours = tk.paged_attention(q, k_cache, v_cache, **meta)
    theirs = sdpa(q, k, v, batch, q_len, causal).transpose(1, 2).reshape(ours.shape)
    err = float((ours.float() - theirs.float()).norm() / theirs.float().norm())
    ours_us = graph_time_us(lambda: tk.paged_attention(q, k_cache, v_cache, **meta))
    sdpa_us = graph_time_us(lambda: sdpa(q, k, v, batch, q_len, causal))
    return dict(us=round(ours_us, 2), sdpa_us=round(sdpa_us, 2), sdpa_over_ours=round(sdpa_us / ours_us, 3),
                rel_error_vs_sdpa=err)


def sweep(case, batch, q_len, causal) -> dict:
    """Time each SWEEP launch shape on one case; -> the default's time and the best shape."""
    q, k, v, k_cache, v_cache, meta = case
    T, H_, D_ = q.shape
    context = meta["max_context_len"]
    base = tk.default_tile(T, batch, H_, HKV, D_, BLOCK, 2, context, q.device)
    tried = []
    for bn, warps, stages, split_factor in SWEEP:
        tile = dict(base, BN=bn, num_warps=warps, num_stages=stages,
                    SPLITS=min(256, base["SPLITS"] * split_factor) if q_len == 1 else 1)
        args = (q, k_cache, v_cache, meta["cu_seqlens_q"], meta["context_lens"], meta["block_tables"],
                meta["scale"], context)
        try:
            us = graph_time_us(lambda: tk._paged_attention(*args, tile=tile), replays=10)
        except Exception as exc:  # noqa: BLE001 - out of resources: not a candidate
            print(f"  skipped {tile}: {type(exc).__name__}", file=sys.stderr)
            continue
        tried.append((us, tile))
    best_us, best_tile = min(tried, key=lambda p: p[0])
    return dict(default_tile=base, best_us=round(best_us, 2), best_tile=best_tile,
                tried=[(round(us, 2), {key: t[key] for key in ("BN", "num_warps", "num_stages", "SPLITS")})
                       for us, t in tried])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also try other launch shapes on SWEEP_CASES")
    args = parser.parse_args()
    rates = ceilings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for context in CONTEXTS:
        for batch in BATCHES:
            kv_bytes = 2 * batch * context * HKV * D * 2
            if kv_bytes / 1e9 > MAX_KV_GB:
                continue
            case = paged_case(batch, context, 1, gen)
            row = dict(kind="decode", batch=batch, context=context, kv_bytes=kv_bytes,
                       **compare(*case, batch, 1, causal=False))
            row["fraction_of_copy"] = round(kv_bytes / row["us"] / 1e3 / rates["copy_GBps"], 3)
            if args.sweep and (batch, context) in SWEEP_CASES:
                row["sweep"] = sweep(case, batch, 1, causal=False)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            del case
            torch.cuda.empty_cache()
    case = paged_case(1, 4096, 4096, gen)
    row = dict(kind="prefill", batch=1, context=4096, q_len=4096, **compare(*case, 1, 4096, causal=True))
    row["TFLOPs"] = round(2 * 2 * H * D * 4096 * 4096 / 2 / row["us"] / 1e6, 1)
    if args.sweep:
        row["sweep"] = sweep(case, 1, 4096, causal=True)
    rows.append(row)
    result = dict(benchmark="bench_attention", card=card(), commit=git_commit(), command=" ".join(sys.argv),
                  ceilings=rates, shape=dict(heads=H, kv_heads=HKV, head_dim=D, block_size=BLOCK, dtype="bfloat16"),
                  rows=rows)
    emit(result, args.out)


if __name__ == "__main__":
    main()
