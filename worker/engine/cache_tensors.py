"""The cache tensors the model reads and writes: paged KV per full-attention layer and GDN state pools.

The cache manager deals in integer block and slot-group ids; this module sizes and allocates the
tensors behind those ids and binds them to the model's layers.
"""

from dataclasses import dataclass

import torch

from worker.model.qwen3_next import Qwen3NextForCausalLM


@dataclass(frozen=True)
class CacheShapes:
    num_attention_layers: int
    num_gdn_layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    conv_dim: int
    conv_width: int  # K - 1 + k
    slots_per_group: int  # 1 + k
    v_heads: int
    k_head_dim: int
    v_head_dim: int
    kv_dtype: torch.dtype
    conv_dtype: torch.dtype
    ssm_dtype: torch.dtype

    @classmethod
    def for_model(cls, model: Qwen3NextForCausalLM, block_size: int, num_spec_tokens: int,
                  dtype: torch.dtype, ssm_dtype: torch.dtype = torch.float32) -> "CacheShapes":
        attn, gdn = model.attention_layers(), model.gdn_layers()
        some_gdn = gdn[0] if gdn else None
        return cls(
            num_attention_layers=len(attn),
            num_gdn_layers=len(gdn),
            block_size=block_size,
            kv_heads=attn[0].num_kv_heads if attn else 0,
            head_dim=attn[0].head_dim if attn else 0,
            conv_dim=some_gdn.conv1d.weight.shape[0] if some_gdn else 0,
            conv_width=(some_gdn.conv_kernel - 1 + num_spec_tokens) if some_gdn else 0,
            slots_per_group=1 + num_spec_tokens,
            v_heads=some_gdn.num_v_heads if some_gdn else 0,
            k_head_dim=some_gdn.head_k_dim if some_gdn else 0,
            v_head_dim=some_gdn.head_v_dim if some_gdn else 0,
            kv_dtype=dtype,
            conv_dtype=dtype,
            ssm_dtype=ssm_dtype,
        )

    @property
    def bytes_per_block(self) -> int:
        per_layer = 2 * self.block_size * self.kv_heads * self.head_dim * self.kv_dtype.itemsize
        return self.num_attention_layers * per_layer

    @property
    def bytes_per_state_group(self) -> int:
        conv = self.conv_dim * self.conv_width * self.conv_dtype.itemsize
        ssm = self.slots_per_group * self.v_heads * self.k_head_dim * self.v_head_dim * self.ssm_dtype.itemsize
        return self.num_gdn_layers * (conv + ssm)


def allocate_and_bind(model: Qwen3NextForCausalLM, shapes: CacheShapes, num_blocks: int, num_state_groups: int,
                      device: torch.device | str) -> None:
    """Allocate every cache tensor and hand it to its layer. States start at zero; sequences that
    start fresh never read them anyway (has_initial_state=False)."""
    for layer in model.attention_layers():
        shape = (num_blocks, shapes.block_size, shapes.kv_heads, shapes.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=shapes.kv_dtype, device=device)
        layer.v_cache = torch.zeros(shape, dtype=shapes.kv_dtype, device=device)
    for layer in model.gdn_layers():
        layer.conv_states = torch.zeros(
            (num_state_groups, shapes.conv_dim, shapes.conv_width), dtype=shapes.conv_dtype, device=device)
        layer.ssm_states = torch.zeros(
            (num_state_groups, shapes.slots_per_group, shapes.v_heads, shapes.k_head_dim, shapes.v_head_dim),
            dtype=shapes.ssm_dtype, device=device)
