"""Attention over a paged KV cache, Triton kernels (the torch reference is worker.kernels.paged_attention).

reshape_and_cache: one program per token copies its [H_kv, D] key and value rows into the slot;
a negative slot (PAD) writes nothing.

paged_attention: one program per (chunk of BM query tokens of one sequence, KV head). The program
packs its BM tokens x the H / H_kv query heads of that KV head into the rows of one tile, so the
keys and values of a GQA group are read once, and walks the sequence's block table one tile of
BN = max(block_size, 16) keys at a time (one cache block, or several small ones) with an online
softmax in fp32 (exp2, the scale folded into log2 e).
Only the blocks a chunk's last query can see are visited. Chunks are numbered per sequence from
cu_seqlens_q[b] // BM + b (the GDN kernels' `_find_sequence`), so a grid of T // BM + B programs
covers every chunk with no host sync; BM is a tile choice from T / B only, so decode (q_len 1),
verify (1 + k) and chunked prefill all run the same kernel and stay capturable in CUDA graphs.
"""

import math

import torch
import triton
import triton.language as tl

from worker.kernels.triton_gated_delta_rule_chunked import _interpreting
from worker.kernels.triton_gated_delta_rule_wy import _dot_precision, _find_sequence

MAX_ROWS = 64  # query rows (tokens x heads of a GQA group) per program
MIN_ROWS = 16  # tl.dot needs at least 16 rows ...
MIN_KEYS = 16  # ... and columns: smaller cache blocks are read several to a key tile


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
def _attend_block(q, k_cache, v_cache, table, blk, kv_len, q_pos, m_i, l_i, acc, qk_scale, d, dmask, kvh,
                  stride_c_b, stride_c_s, stride_c_h, BS: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with keys blk * BN .. blk * BN + BN - 1 (BN / BS cache blocks)."""
    kpos = blk * BN + tl.arange(0, BN)
    kmask = kpos < kv_len
    page = tl.load(table + kpos // BS, mask=kmask, other=0).to(tl.int64)
    row = page * stride_c_b + (kpos % BS) * stride_c_s  # k and v caches share one layout (checked on the host)
    k = tl.load(k_cache + row[:, None] + kvh * stride_c_h + d[None, :], mask=kmask[:, None] & dmask[None, :],
                other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # [BM*BG, BN], log2 units
    visible = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache + row[:, None] + kvh * stride_c_h + d[None, :], mask=kmask[:, None] & dmask[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out,
    qk_scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
    B, GROUP, D,
    BM: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, LOG_B: tl.constexpr,
    DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Rows r of the tile are (token r // BG of the chunk, query head r % BG of the KV head's group)."""
    chunk = tl.program_id(0)
    kvh = tl.program_id(1)
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
    o_ptr = out + tok[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :]
    if kv_len == 0:  # the reference leaves zeros
        tl.store(o_ptr, tl.zeros([BM * BG, BD], dtype=out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        return
    q = tl.load(query + tok[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(k_cache.dtype.element_ty)
    q_pos = kv_len - q_len + i  # the last key each row sees
    last = tl.minimum(cs - start + BM, q_len)  # one past the chunk's last query
    kv_end = kv_len - q_len + last  # keys any row of the chunk sees
    m_i = tl.full([BM * BG], -1.0e30, dtype=tl.float32)  # finite, so fully masked blocks give exp2(-inf) = 0
    l_i = tl.zeros([BM * BG], dtype=tl.float32)
    acc = tl.zeros([BM * BG, BD], dtype=tl.float32)
    table = block_tables + n.to(tl.int64) * stride_bt_b
    num_blocks = (kv_end + BN - 1) // BN
    if INTERPRET:  # the interpreter cannot index a range by loaded bounds
        blk = 0
        while blk < num_blocks:
            m_i, l_i, acc = _attend_block(q, k_cache, v_cache, table, blk, kv_len, q_pos, m_i, l_i, acc, qk_scale, d,
                                          dmask, kvh, stride_c_b, stride_c_s, stride_c_h, BS, BN, DOT)
            blk += 1
    else:
        for blk in range(0, num_blocks):
            m_i, l_i, acc = _attend_block(q, k_cache, v_cache, table, blk, kv_len, q_pos, m_i, l_i, acc, qk_scale, d,
                                          dmask, kvh, stride_c_b, stride_c_s, stride_c_h, BS, BN, DOT)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key (q_len > kv_len) stays 0
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


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


def _query_tile(T: int, B: int, group: int) -> tuple[int, int]:
    """(BM tokens, BG heads) per program: BM from the mean query length T / B (a tile choice, not a
    bound: any sequence longer than BM gets more chunks), BM * BG rows between MIN_ROWS and MAX_ROWS."""
    BG = triton.next_power_of_2(group)
    max_tokens = max(1, MAX_ROWS // BG)
    BM = min(max_tokens, triton.next_power_of_2(max(1, triton.cdiv(T, max(B, 1)))))
    BM = max(BM, triton.cdiv(MIN_ROWS, BG))
    return BM, BG


def _paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    T, H, D = query.shape
    HKV, BS = k_cache.shape[2], k_cache.shape[1]
    B = context_lens.shape[0]
    out = _empty_output(query)
    if T == 0 or B == 0:
        return out
    group = H // HKV
    BM, BG = _query_tile(T, B, group)
    log_b = max(1, math.ceil(math.log2(B + 1)))
    _paged_attention_kernel[(T // BM + B, HKV)](
        query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        B, group, D,
        BM=BM, BG=BG, BS=BS, BN=max(BS, MIN_KEYS), BD=triton.next_power_of_2(D), LOG_B=log_b,
        DOT=_dot_precision(k_cache.dtype), INTERPRET=_interpreting(),
        num_warps=4 if D <= 128 else 8,
    )
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
    query = _inner_contiguous(query)
    return _paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
