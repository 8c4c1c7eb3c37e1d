"""Attention over a paged KV cache, Triton kernels (the torch reference is worker.kernels.paged_attention).

reshape_and_cache: one program per token copies its [H_kv, D] key and value rows into the slot;
a negative slot (PAD) writes nothing.

paged_attention: one program per (chunk of BM query tokens of one sequence, KV head, key split).
The program packs its BM tokens x the H / H_kv query heads of that KV head into the rows of one
tile, so the keys and values of a GQA group are read once, and walks the sequence's block table one
tile of BN keys at a time (one cache block, or several) with an online softmax in fp32 (exp2, the
scale folded into log2 e). Only the keys a chunk's last query can see are visited.
Chunks are numbered per sequence from cu_seqlens_q[b] // BM + b (the GDN kernels' `_find_sequence`),
so a grid of T // BM + B chunks covers every chunk with no host sync; BM is a tile choice from T / B
only, so decode (q_len 1), verify (1 + k) and chunked prefill all run the same kernel and stay
capturable in CUDA graphs. When the chunks are too few to fill the GPU (decode at small batch),
each chunk's keys are cut into SPLITS ranges (flash-decoding); the splits' partial results are
merged by a second kernel in split order, so the result does not depend on scheduling.
"""

import math

import torch
import triton
import triton.language as tl

from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, attach_token_groups, quantisable
from worker.kernels.fp8.triton import _quantize_groups
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule_chunked import _interpreting, _num_sms
from worker.kernels.triton_gated_delta_rule_wy import _dot_precision, _find_sequence

TILE_BYTES = 32 * 1024  # query rows x head dim x element size per program: fp32 at D = 256 takes 32 rows
MAX_ROWS = 64  # query rows (tokens x heads of a GQA group) per program
MIN_ROWS = 16  # tl.dot needs at least 16 rows ...
MIN_KEYS = 16  # ... and columns: smaller cache blocks are read several to a key tile
# Keys per tile x head dim x element size, and warps / pipelining depth, as the H200 sweep chose
# (benchmarks/results/attention_h200.json): decode-sized query tiles read 64 keys of 256 in bf16 with
# 4 warps, 2 stages; prefill tiles (64 query rows) 32 keys, 4 warps, 4 stages. fp32 keeps smaller tiles.
DECODE_KEY_TILE_BYTES = 32 * 1024
PREFILL_KEY_TILE_BYTES = 16 * 1024
MAX_KEYS = 128
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256
PROGRAMS_PER_SM = 4  # the decode grid is split along the keys until it has this many programs per SM

def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _reshape_and_cache_kernel(
    key, value, k_cache, v_cache, slot_mapping,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    HKV, D, BLOCK_SIZE,
    BH: tl.constexpr, BD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    mask = (h < HKV)[:, None] & (d < D)[None, :]
    k = tl.load(key + t * stride_k_t + h[:, None] * stride_k_h + d[None, :], mask=mask)
    v = tl.load(value + t * stride_v_t + h[:, None] * stride_v_h + d[None, :], mask=mask)
    tl.store(k_cache + block * stride_kc_b + offset * stride_kc_s + h[:, None] * stride_kc_h + d[None, :],
             k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + block * stride_vc_b + offset * stride_vc_s + h[:, None] * stride_vc_h + d[None, :],
             v.to(v_cache.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(q, k_cache, v_cache, table, kpos, kv_len, q_pos, m_i, l_i, acc, qk_scale, d, dmask, kvh,
                 stride_c_b, stride_c_s, stride_c_h, BS: tl.constexpr, DOT: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with the keys at positions kpos [BN]."""
    kmask = kpos < kv_len
    page = tl.load(table + kpos // BS, mask=kmask, other=0).to(tl.int64)
    row = page * stride_c_b + (kpos % BS) * stride_c_s  # k and v caches share one layout (checked on the host)
    kv_mask = kmask[:, None] & dmask[None, :]
    k = tl.load(k_cache + row[:, None] + kvh * stride_c_h + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # [rows, BN], log2 units
    visible = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache + row[:, None] + kvh * stride_c_h + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, part_acc, part_ml, gate,
    qk_scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_g_t, stride_g_h,
    stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
    T, H, B, GROUP, D,
    BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, LOG_B: tl.constexpr,
    SPLITS: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr, GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    """Rows r of the tile are (token r // BG of the chunk, query head r % BG of the KV head's group).

    With SPLITS > 1 the chunk's keys are cut into SPLITS ranges of whole key tiles, one per
    program; each writes its unnormalised (acc, max, sum) to part_* and the combine kernel merges."""
    pdl_enter(PDL)
    chunk = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = _find_sequence(cu_seqlens_q, chunk, B, BM, LOG_B)
    start = tl.load(cu_seqlens_q + n)
    end = tl.load(cu_seqlens_q + n + 1)
    cs = start + (chunk - start // BM - n) * BM
    if cs >= end:
        return
    q_len = end - start
    kv_len = tl.load(context_lens + n)
    r = tl.arange(0, BM * BG)
    i = cs - start + r // BG  # query index within the sequence
    g = r % BG
    rmask = (i < q_len) & (g < GROUP)
    d = tl.arange(0, BD)
    dmask = d < D
    head = kvh * GROUP + g
    tok = (start + i).to(tl.int64)
    q = tl.load(query + tok[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(k_cache.dtype.element_ty)
    q_pos = kv_len - q_len + i  # the last key each row sees
    last = tl.minimum(cs - start + BM, q_len)  # one past the chunk's last query
    kv_end = tl.maximum(kv_len - q_len + last, 0)  # keys any row of the chunk sees
    num_tiles = (kv_end + BN - 1) // BN
    per_split = (num_tiles + SPLITS - 1) // SPLITS
    tile = split * per_split
    tile_end = tl.minimum(tile + per_split, num_tiles)
    m_i = tl.full([BM * BG], -1.0e30, dtype=tl.float32)  # finite, so fully masked tiles give exp2(-inf) = 0
    l_i = tl.zeros([BM * BG], dtype=tl.float32)
    acc = tl.zeros([BM * BG, BD], dtype=tl.float32)
    table = block_tables + n.to(tl.int64) * stride_bt_b
    kn = tl.arange(0, BN)
    if INTERPRET:  # the interpreter cannot index a range by loaded bounds
        while tile < tile_end:
            m_i, l_i, acc = _attend_tile(q, k_cache, v_cache, table, tile * BN + kn, kv_len, q_pos, m_i, l_i, acc,
                                         qk_scale, d, dmask, kvh, stride_c_b, stride_c_s, stride_c_h, BS, DOT)
            tile += 1
    else:
        for t in range(tile, tile_end):
            m_i, l_i, acc = _attend_tile(q, k_cache, v_cache, table, t * BN + kn, kv_len, q_pos, m_i, l_i, acc,
                                         qk_scale, d, dmask, kvh, stride_c_b, stride_c_s, stride_c_h, BS, DOT)
    omask = rmask[:, None] & dmask[None, :]
    if SPLITS == 1:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key stays 0 (the reference's zeros)
        o = acc.to(out.dtype.element_ty)
        if GATED:
            o = _apply_gate(o, gate + tok[:, None] * stride_g_t + head[:, None] * stride_g_h + d[None, :], omask)
        tl.store(out + tok[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :], o, mask=omask)
    else:
        row = (split * T + tok) * H + head  # part_acc [SPLITS, T, H, BD], part_ml [SPLITS, T, H, 2]
        tl.store(part_acc + row[:, None] * BD + d[None, :], acc, mask=omask)
        tl.store(part_ml + row * 2, m_i, mask=rmask)
        tl.store(part_ml + row * 2 + 1, l_i, mask=rmask)


@triton.jit
def _apply_gate(o, gate_ptr, mask):
    """o * sigmoid(gate) as the model's torch ops round it: the sigmoid and the product each to o's dtype."""
    g = tl.sigmoid(tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)).to(o.dtype)
    return (o.to(tl.float32) * g.to(tl.float32)).to(o.dtype)


@triton.jit
def _combine_splits_kernel(part_acc, part_ml, out, gate, x_q, x_scale, stride_o_t, stride_o_h, stride_g_t,
                           stride_g_h, T, H, D, SPLITS: tl.constexpr, BD: tl.constexpr, GATED: tl.constexpr,
                           G: tl.constexpr, QUANT: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr,
                           PDL: tl.constexpr):
    """out[t, h] = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m), m = max_s m_s, in split order. With QUANT
    (BD == D), also the row's e4m3 groups of G among token t's H * D features, as per_token_group_quant_fp8."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    row = (s * T + t) * H + h
    m_s = tl.load(part_ml + row * 2)
    l_s = tl.load(part_ml + row * 2 + 1)
    scale = tl.exp2(m_s - tl.max(m_s, 0))
    total = tl.sum(l_s * scale, 0)
    d = tl.arange(0, BD)
    acc = tl.load(part_acc + row[:, None] * BD + d[None, :])
    o = (tl.sum(acc * scale[:, None], 0) / tl.where(total > 0, total, 1.0)).to(out.dtype.element_ty)
    if GATED:
        o = _apply_gate(o, gate + t * stride_g_t + h * stride_g_h + d, d < D)
    tl.store(out + t * stride_o_t + h * stride_o_h + d, o, mask=d < D)
    if QUANT:
        q, qs = _quantize_groups(tl.reshape(o.to(tl.float32), (BD // G, G)), FP8_MAX_, MIN_AMAX_)
        i = tl.arange(0, BD // G)
        first = t * (H * D // G) + h * (D // G)
        tl.store(x_q + (first + i)[:, None] * G + tl.arange(0, G)[None, :], q.to(x_q.dtype.element_ty))
        tl.store(x_scale + first + i, qs)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_caches(k_cache, v_cache):
    _check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
           f"k_cache and v_cache must be [num_blocks, block_size, H_kv, D], got {tuple(k_cache.shape)}, "
           f"{tuple(v_cache.shape)}")
    _check(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "k_cache and v_cache must be contiguous in D")


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _query_tile(T: int, B: int, group: int, D: int, elem_bytes: int) -> tuple[int, int]:
    """(BM tokens, BG heads) per program: BM from the mean query length T / B (a tile choice, not a
    bound: any sequence longer than BM gets more chunks), BM * BG rows between MIN_ROWS and a cap
    that keeps the query and accumulator tiles in registers (fp32 at D = 256 overflowed them)."""
    BG = triton.next_power_of_2(group)
    max_rows = max(MIN_ROWS, min(MAX_ROWS, TILE_BYTES // (triton.next_power_of_2(D) * elem_bytes)))
    max_tokens = max(1, max_rows // BG)
    BM = min(max_tokens, triton.next_power_of_2(max(1, triton.cdiv(T, max(B, 1)))))
    BM = max(BM, triton.cdiv(MIN_ROWS, BG))
    return BM, BG


def _key_tile(block_size: int, D: int, elem_bytes: int, tile_bytes: int) -> int:
    return max(block_size, MIN_KEYS, min(MAX_KEYS, tile_bytes // (triton.next_power_of_2(D) * elem_bytes)))


def _num_splits(num_programs: int, max_context_len: int, device: torch.device) -> int:
    """Key ranges per chunk: enough programs to fill the GPU, at least MIN_KEYS_PER_SPLIT keys each
    when the longest context is known (0: unknown). From shapes and host metadata only."""
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), num_programs)
    if max_context_len > 0:
        want = min(want, triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT))
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, want)))


def default_tile(T: int, B: int, H: int, HKV: int, D: int, block_size: int, elem_bytes: int, max_context_len: int,
                 device: torch.device) -> dict:
    """Launch shape of one call, from shapes and host metadata only (so a CUDA graph can fix it)."""
    BM, BG = _query_tile(T, B, H // HKV, D, elem_bytes)
    tile = dict(BM=BM, BG=BG, SPLITS=_num_splits((T // BM + B) * HKV, max_context_len, device))
    if elem_bytes == 4:
        return dict(tile, BN=_key_tile(block_size, D, 4, PREFILL_KEY_TILE_BYTES), num_warps=4 if D <= 128 else 8,
                    num_stages=2)
    if BM * BG >= MAX_ROWS:
        return dict(tile, BN=_key_tile(block_size, D, elem_bytes, PREFILL_KEY_TILE_BYTES), num_warps=4, num_stages=4)
    return dict(tile, BN=_key_tile(block_size, D, elem_bytes, DECODE_KEY_TILE_BYTES), num_warps=4, num_stages=2)


def _paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_context_len,
                     output_gate=None, tile: dict | None = None, quant_block: int | None = None):
    T, H, D = query.shape
    HKV, BS = k_cache.shape[2], k_cache.shape[1]
    B = context_lens.shape[0]
    out = _empty_output(query)
    if T == 0 or B == 0:
        return out
    tile = tile or default_tile(T, B, H, HKV, D, BS, k_cache.element_size(), max_context_len, query.device)
    BM, splits = tile["BM"], tile["SPLITS"]
    BD = triton.next_power_of_2(D)
    num_chunks = T // BM + B
    part_acc = part_ml = out  # unused with one split
    if splits > 1:
        part_acc = torch.empty(splits, T, H, BD, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(splits, T, H, 2, dtype=torch.float32, device=query.device)
    gate = out if output_gate is None else output_gate  # unused without a gate
    _paged_attention_kernel[(num_chunks, HKV, splits)](
        query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, part_acc, part_ml, gate,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), gate.stride(0), gate.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        T, H, B, H // HKV, D,
        BM=BM, BG=tile["BG"], BS=BS, BN=max(tile["BN"], BS), BD=BD, LOG_B=max(1, math.ceil(math.log2(B + 1))),
        SPLITS=splits, DOT=_dot_precision(k_cache.dtype), INTERPRET=_interpreting(), GATED=output_gate is not None,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], **pdl_launch(query.device)
    )
    if splits > 1:
        quant = quantisable(D, quant_block)
        x_q = torch.empty(T, H * D, dtype=FP8_DTYPE, device=out.device) if quant else out
        x_scale = torch.empty(T, H * D // quant_block, dtype=torch.float32, device=out.device) if quant else out
        _combine_splits_kernel[(T, H)](part_acc, part_ml, out, gate, x_q, x_scale, out.stride(0), out.stride(1),
                                       gate.stride(0), gate.stride(1), T, H, D, SPLITS=splits, BD=BD,
                                       GATED=output_gate is not None, G=quant_block if quant else 1, QUANT=quant,
                                       FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX, num_warps=4, **pdl_launch(query.device))
        if quant:  # the o projection's e4m3 groups of each token's H * D features (flatten_tokens keeps them)
            attach_token_groups(out, x_q, x_scale, quant_block)
    return out


def reshape_and_cache(
    key: torch.Tensor,  # [T, H_kv, D]
    value: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    slot_mapping: torch.Tensor,  # [T], negative slots are skipped
) -> None:
    """Writes each token's key and value to its slot `block * block_size + offset`."""
    _check(key.dim() == 3 and value.shape == key.shape,
           f"key and value must be [T, H_kv, D], got {tuple(key.shape)}, {tuple(value.shape)}")
    T, HKV, D = key.shape
    _check_caches(k_cache, v_cache)
    _check(tuple(k_cache.shape[2:]) == (HKV, D), f"caches must be [num_blocks, block_size, {HKV}, {D}], "
                                                 f"got {tuple(k_cache.shape)}")
    _check(slot_mapping.shape == (T,), f"slot_mapping must be [{T}], got {tuple(slot_mapping.shape)}")
    if T == 0:
        return
    key, value = _inner_contiguous(key), _inner_contiguous(value)
    _reshape_and_cache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HKV, D, k_cache.shape[1],
        BH=triton.next_power_of_2(HKV), BD=triton.next_power_of_2(D), num_warps=4,
    )


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    cu_seqlens_q: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
    max_context_len: int = 0,  # a bound on context_lens known on the host (0: unknown); tiling only
    output_gate: torch.Tensor | None = None,  # [T, H, D], may be strided: the output is multiplied by its sigmoid
    quant_block: int | None = None,  # where the keys are split, the output also carries its e4m3 groups of this
) -> torch.Tensor:  # [T, H, D]
    """Query i of a sequence with KV length L and q_len queries sees keys 0 .. L - q_len + i."""
    _check(query.dim() == 3, f"query must be [T, H, D], got {tuple(query.shape)}")
    T, H, D = query.shape
    _check_caches(k_cache, v_cache)
    HKV, BS = k_cache.shape[2], k_cache.shape[1]
    _check(k_cache.shape[3] == D, f"caches must have head dim {D}, got {tuple(k_cache.shape)}")
    _check(H % HKV == 0, f"query heads {H} must be a multiple of the KV heads {HKV}")
    _check(BS & (BS - 1) == 0, f"block_size must be a power of two, got {BS}")
    _check(v_cache.stride() == k_cache.stride(), "k_cache and v_cache must have the same strides")
    B = context_lens.shape[0]
    _check(cu_seqlens_q.shape == (B + 1,), f"cu_seqlens_q must be [{B + 1}] for {B} context lengths")
    _check(block_tables.dim() == 2 and block_tables.shape[0] == B,
           f"block_tables must be [{B}, max_blocks], got {tuple(block_tables.shape)}")
    _check(block_tables.stride(1) == 1 or block_tables.shape[1] <= 1, "block_tables must be contiguous in its rows")
    if output_gate is not None:
        _check(output_gate.shape == query.shape, f"output_gate must be {tuple(query.shape)}, got "
                                                 f"{tuple(output_gate.shape)}")
        output_gate = _inner_contiguous(output_gate)
    query = _inner_contiguous(query)
    return _paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                            max_context_len, output_gate, quant_block=quant_block)
