"""Attention over a paged KV cache, torch reference.

Caches are `[num_blocks, block_size, H_kv, D]`; a token's slot is `block * block_size + offset`.
The queries of a sequence are its last `q_len` positions, so query i of a sequence with KV length
`L` sees keys 0 .. L - q_len + i (causal within the step, all of the cached context before it).
"""

import functools

import torch


def reshape_and_cache(
    key: torch.Tensor,  # [T, H_kv, D]
    value: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    slot_mapping: torch.Tensor,  # [T], negative slots are skipped
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    cu_seqlens_q: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
    max_context_len: int = 0,  # a bound on context_lens known on the host (0: unknown); the kernel's tiling only
    output_gate: torch.Tensor | None = None,  # [T, H, D], may be strided: the output is multiplied by its sigmoid
    quant_block: int | None = None,  # the kernel's e4m3 groups for an FP8 o projection; the reference's op makes none
) -> torch.Tensor:  # [T, H, D]
    """Consecutive sequences with the same query length (every decode or verify step) attend as one batch."""
    out = _ungated(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    return out if output_gate is None else out * torch.sigmoid(output_gate)


def _ungated(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale) -> torch.Tensor:
    bounds, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    runs = list(_runs(bounds, lens))
    if runs == [(0, len(lens))] and bounds[-1] == query.shape[0]:  # one batch holds every query row
        return _attend_rows(query, k_cache, v_cache, bounds, lens, block_tables, scale, 0, len(lens))
    out = torch.zeros_like(query)
    for first, end in runs:
        rows = slice(bounds[first], bounds[end])
        out[rows] = _attend_rows(query, k_cache, v_cache, bounds, lens, block_tables, scale, first, end)
    return out


def _attend_rows(query, k_cache, v_cache, bounds, lens, block_tables, scale, first: int, end: int) -> torch.Tensor:
    """The output rows [bounds[first], bounds[end]) of sequences first .. end-1, which share one query length."""
    q_len = bounds[first + 1] - bounds[first]
    q = query[bounds[first] : bounds[end]].view(end - first, q_len, *query.shape[1:])
    o = _attend(q, k_cache, v_cache, lens[first:end], block_tables[first:end], scale)
    return o.flatten(0, 1).to(query.dtype)


def _runs(bounds: list[int], lens: list[int]):
    """(first, end) of each maximal run of consecutive sequences with one query length and queries that see keys."""
    first = None
    for b in range(len(lens) + 1):
        attends = b < len(lens) and bounds[b + 1] > bounds[b] and lens[b] > 0
        same = first is not None and attends and bounds[b + 1] - bounds[b] == bounds[first + 1] - bounds[first]
        if first is not None and not same:
            yield first, b
            first = None
        if attends and first is None:
            first = b


def _attend(
    q: torch.Tensor,  # [N, Q, H, D] the last Q positions of each sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: list[int],  # [N]
    block_tables: torch.Tensor,  # [N, max_blocks]
    scale: float,
) -> torch.Tensor:  # [N, Q, H, D] fp32
    n, q_len, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group, max_kv = heads // kv_heads, max(kv_lens)
    blocks = block_tables[:, : (max_kv + block_size - 1) // block_size].reshape(-1)
    keys = _gather_blocks(k_cache, blocks, n, max_kv)  # [N, L, H_kv, D] fp32
    values = _gather_blocks(v_cache, blocks, n, max_kv)
    # Query head h reads KV head h // group: the group's queries of all Q positions share one product.
    qf = q.float().view(n, q_len, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * q_len, dim)
    scores = (qf @ keys.permute(0, 2, 3, 1)) * scale  # [N, H_kv, group * Q, L]
    hidden, past_end = _masks(tuple(kv_lens), q_len, q.device)
    if hidden is not None:
        scores = scores.view(n, kv_heads, group, q_len, max_kv).masked_fill(hidden, float("-inf"))
        scores = scores.view(n, kv_heads, group * q_len, max_kv)
    if past_end is not None:  # keys past a sequence's end may be NaN: a zero weight must meet a zero value
        values = values.masked_fill(past_end, 0.0)
    o = scores.softmax(dim=-1) @ values.transpose(1, 2)  # [N, H_kv, group * Q, D]
    return o.view(n, kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4).reshape(n, q_len, heads, dim)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """The first `length` slots of each sequence's blocks (`blocks` [N * num_blocks], row by row) -> [N, length, ...]."""
    rows = cache.index_select(0, blocks)  # int32 ids as stored, no cast
    return rows.view(n, -1, *cache.shape[2:])[:, :length].float()


@functools.lru_cache(maxsize=8)
def _masks(kv_lens: tuple[int, ...], q_len: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (`_hidden_keys`, [N, L, 1, 1] True for keys past each sequence's end or None if none are), built once
    for the step's attention layers (and the MTP's first pass), which share the lengths. Read only."""
    past_end = None
    if min(kv_lens) < max(kv_lens):
        past_end = torch.arange(max(kv_lens), device=device) >= torch.tensor(kv_lens, device=device)[:, None]
        past_end = past_end[:, :, None, None]
    return _hidden_keys(kv_lens, q_len, device), past_end


def _hidden_keys(kv_lens: tuple[int, ...], q_len: int, device) -> torch.Tensor | None:
    """-> [N or 1, 1, 1, Q, L] True where query i (position kv_len - Q + i) must not see key j, None if it sees all."""
    max_kv = max(kv_lens)
    if min(kv_lens) == max_kv:  # one causal band for every sequence
        if q_len == 1:
            return None
        return torch.ones(q_len, max_kv, dtype=torch.bool, device=device).triu(max_kv - q_len + 1)[None, None, None]
    last_visible = torch.tensor(kv_lens, device=device)[:, None] - q_len + torch.arange(q_len, device=device)  # [N, Q]
    return (torch.arange(max_kv, device=device) > last_visible[..., None])[:, None, None]
