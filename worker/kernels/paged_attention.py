"""Attention over a paged KV cache, torch reference.

Caches are `[num_blocks, block_size, H_kv, D]`; a token's slot is `block * block_size + offset`.
The queries of a sequence are its last `q_len` positions, so query i of a sequence with KV length
`L` sees keys 0 .. L - q_len + i (causal within the step, all of the cached context before it).
"""

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
) -> torch.Tensor:  # [T, H, D]
    out = torch.zeros_like(query)
    block_size = k_cache.shape[1]
    group = query.shape[1] // k_cache.shape[2]
    bounds, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for b in range(len(lens)):
        start, end, kv_len = bounds[b], bounds[b + 1], lens[b]
        if end == start or kv_len == 0:
            continue
        blocks = block_tables[b, : (kv_len + block_size - 1) // block_size].long()
        keys = k_cache[blocks].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
        values = v_cache[blocks].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        q_pos = torch.arange(kv_len - (end - start), kv_len, device=query.device)
        visible = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values).to(out.dtype)
    return out
