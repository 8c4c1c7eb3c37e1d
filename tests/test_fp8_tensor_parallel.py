"""Tensor parallelism of FP8 weights and their 128 x 128 block scales, without a process group.

Layers wider than a block (so shards hold several whole blocks, some partial at the edges) are built
as each rank of tp 2 would build them, loaded from one checkpoint tensor, and run: the column shards'
outputs side by side, and the row and expert shards' partial sums added, equal the one-rank layer.
Where a shard would split a block, the layer refuses, naming itself and the tp, before ranks start.
"""

import math

import numpy as np
import pytest
import torch

from worker import LLM
from worker.config import ConfigError, Fp8Config, ModelConfig
from worker.distributed import tensor_parallel_as
from worker.kernels.fp8.quant import quantize_block_fp8
from worker.kernels.moe.reference import select_experts
from worker.model.layers.checkpoint_tensor import CheckpointTensor
from worker.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.model.moe import Experts
from worker.model.shard_check import check_model_shards
from worker.tools.model_shapes import shape_config
from worker.tools.tiny_weights import PortableRandom

QUANT = Fp8Config(weight_block_size=(128, 128))
TP = 2


def portable(*shape, seed: int, std: float = 1.0) -> torch.Tensor:
    values = PortableRandom(seed).normal(math.prod(shape)) * std
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, CheckpointTensor.from_tensor(tensor, param.dtype), shard_id)


def linear_on_ranks(cls, in_features, out_features, weight, scale, **kwargs):
    """-> the layer at tp 1 and at each rank of tp TP, loaded from the same (weight, scale)."""
    layers = []
    for rank, size in [(0, 1)] + [(r, TP) for r in range(TP)]:
        with tensor_parallel_as(rank, size):
            layer = cls(in_features, out_features, quant_config=QUANT, prefix="layer", **kwargs)
        load(layer, "weight", weight)
        load(layer, "weight_scale_inv", scale)
        layers.append(layer)
    return layers[0], layers[1:]


def test_column_shards_hold_whole_blocks_and_give_the_one_rank_rows():
    weight, scale = quantize_block_fp8(portable(512, 200, seed=1, std=200**-0.5), 128)  # K: one full, one partial block
    whole, ranks = linear_on_ranks(ColumnParallelLinear, 200, 512, weight, scale)
    for rank, layer in enumerate(ranks):
        assert layer.weight.shape == (256, 200) and layer.weight_scale_inv.shape == (2, 2)
        assert layer.weight.view(torch.uint8).equal(weight[256 * rank : 256 * (rank + 1)].view(torch.uint8))
        assert layer.weight_scale_inv.equal(scale[2 * rank : 2 * rank + 2])
    x = portable(37, 200, seed=2)
    torch.testing.assert_close(torch.cat([layer(x) for layer in ranks], dim=-1), whole(x), rtol=1e-6, atol=1e-6)


def test_row_shards_quantise_activations_in_the_same_groups_and_sum_to_the_one_rank_output():
    weight, scale = quantize_block_fp8(portable(200, 512, seed=3, std=512**-0.5), 128)  # N: partial last block
    whole, ranks = linear_on_ranks(RowParallelLinear, 512, 200, weight, scale, reduce_results=False)
    for rank, layer in enumerate(ranks):
        assert layer.weight.shape == (200, 256) and layer.weight_scale_inv.shape == (2, 2)
        assert layer.weight_scale_inv.equal(scale[:, 2 * rank : 2 * rank + 2])
    x = portable(37, 512, seed=4)
    partial = sum(layer(x[:, 256 * rank : 256 * (rank + 1)]) for rank, layer in enumerate(ranks))
    torch.testing.assert_close(partial, whole(x), rtol=1e-5, atol=1e-5)


def test_expert_shards_split_gate_and_up_in_whole_blocks():
    experts, hidden, inter = 3, 200, 256
    stored = {(e, p): quantize_block_fp8(portable(*((hidden, inter) if p == "down_proj" else (inter, hidden)),
                                                  seed=10 * e + i, std=0.1), 128)
              for e in range(experts) for i, p in enumerate(("gate_proj", "up_proj", "down_proj"))}
    layers = []
    for rank, size in [(0, 1)] + [(r, TP) for r in range(TP)]:
        with tensor_parallel_as(rank, size):
            layer = Experts(experts, hidden, inter, block=128, prefix="experts")
        for (e, p), (weight, scale) in stored.items():
            load(layer, "w2" if p == "down_proj" else "w13", weight, (e, p))
            load(layer, "w2_scale_inv" if p == "down_proj" else "w13_scale_inv", scale, (e, p))
        layers.append(layer)
    whole, ranks = layers[0], layers[1:]
    for rank, layer in enumerate(ranks):
        assert layer.w13_scale_inv.shape == (experts, 2, 2) and layer.w2_scale_inv.shape == (experts, 2, 1)
        assert layer.w13_scale_inv[1, 1].equal(stored[(1, "up_proj")][1][rank])
        assert layer.w2_scale_inv[2].equal(stored[(2, "down_proj")][1][:, rank : rank + 1])
    x = portable(21, hidden, seed=5)
    weights, ids = select_experts(portable(21, experts, seed=6, std=2.0), 2, renormalize=True)
    partial = sum(layer(x, weights, ids) for layer in ranks)
    torch.testing.assert_close(partial, whole(x, weights, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals

def fp8_80b(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**shape_config("qwen3-next-80b", num_layers=4, quantize="fp8"), **overrides})


def test_80b_fp8_shards_at_tp_1_2_4_and_refuses_8_naming_the_experts():
    config = fp8_80b()
    assert config.quantization.block == 128 and not config.quantization.is_quantized("model.layers.0.mlp.gate")
    for size in (1, 2, 4):
        check_model_shards(config, size)
    # 512 / 8 = 64 rows per rank: the shared expert (fused with the routed ones) of SGLang issue 10852.
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts: tensor parallel size 8 leaves each rank "
                                          r"64 of its 512 .*fused shared expert.*128x128 FP8 weight blocks"):
        check_model_shards(config, 8)


def test_an_unfused_shared_expert_is_refused_by_its_own_name():
    config = fp8_80b(moe_intermediate_size=1024)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.shared_expert\.gate_proj: tensor parallel size 8 "
                                          r"leaves each rank 64 of its 512 output rows"):
        check_model_shards(config, 8)


def test_row_parallel_split_block_is_refused_by_name():
    with tensor_parallel_as(0, 4), pytest.raises(ValueError, match=r"o_proj: tensor parallel size 4 leaves each rank "
                                                                   r"64 of its 256 input columns"):
        RowParallelLinear(256, 128, quant_config=QUANT, prefix="model.layers.3.self_attn.o_proj")


def test_llm_refuses_before_starting_ranks(checkpoint_factory):
    model_dir = checkpoint_factory("tiny-tp", dtype="bfloat16", fp8_block_size=128)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts: tensor parallel size 2 leaves each "
                                          r"rank 16"):
        LLM(model_dir, tensor_parallel_size=2, cache_memory_bytes=32 << 20)


def qwen3_5_gdn_config(block: int) -> ModelConfig:
    """One Qwen3.5 GDN layer (separate in_proj_qkv / z / b / a): 2 key heads of 32, 4 value heads of 16."""
    raw = dict(model_type="qwen3_5_text", vocab_size=64, hidden_size=64, num_hidden_layers=1,
               layer_types=["linear_attention"], num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               intermediate_size=128, linear_key_head_dim=32, linear_value_head_dim=16, linear_num_key_heads=2,
               linear_num_value_heads=4, quantization_config={"weight_block_size": [block, block],
                                                              "modules_to_not_convert": ["in_proj_b", "in_proj_a"]})
    return ModelConfig.from_dict(raw)


def test_qwen3_5_in_proj_qkv_shards_its_q_k_v_parts_in_whole_blocks():
    from worker.model.gdn import GatedDeltaNet

    full = portable(192, 64, seed=7, std=0.125)  # rows [q 64 | k 64 | v 64]
    weight, scale = quantize_block_fp8(full, 16)
    config = qwen3_5_gdn_config(16)
    for rank in range(TP):
        with tensor_parallel_as(rank, TP):
            gdn = GatedDeltaNet(config, "model.layers.0.linear_attn")
        proj = gdn.in_proj_qkv
        load(proj, "weight", weight)
        load(proj, "weight_scale_inv", scale)
        rows = torch.cat([torch.arange(part + 32 * rank, part + 32 * (rank + 1)) for part in (0, 64, 128)])
        assert proj.weight.view(torch.uint8).equal(weight[rows].view(torch.uint8))
        assert proj.weight_scale_inv.equal(scale[rows[::16] // 16])
    # One rank, 128 blocks: q, k and v share the first block, so the tensor is taken whole.
    weight, scale = quantize_block_fp8(full, 128)
    gdn = GatedDeltaNet(qwen3_5_gdn_config(128), "model.layers.0.linear_attn")
    load(gdn.in_proj_qkv, "weight", weight)
    load(gdn.in_proj_qkv, "weight_scale_inv", scale)
    assert gdn.in_proj_qkv.weight_scale_inv.equal(scale) and scale.shape == (2, 1)
    # 48-row blocks: each rank's 96 rows are two whole blocks, but its 32 query rows end inside one.
    with tensor_parallel_as(0, TP), pytest.raises(ValueError, match=r"in_proj_qkv: tensor parallel size 2 leaves each "
                                                                   r"rank 32 of its 64 query/key rows"):
        GatedDeltaNet(qwen3_5_gdn_config(48), "model.layers.0.linear_attn")


def test_fp8_rows_reorder_in_whole_blocks_only():
    """After loading, an FP8 projection's rows can move as whole 16-row blocks (weights and scales
    together: the output is the old output's columns in the new order); an order that would cut a
    block is refused and changes nothing (GatedDeltaNet then keeps its column gather)."""
    quant = Fp8Config(weight_block_size=(16, 16))
    weight, scale = quantize_block_fp8(portable(64, 32, seed=7, std=32**-0.5), 16)
    x = portable(3, 32, seed=8).to(torch.bfloat16)
    with tensor_parallel_as(0, 1):
        layer = ColumnParallelLinear(32, 64, quant_config=quant, prefix="proj")
    load(layer, "weight", weight)
    load(layer, "weight_scale_inv", scale)
    before = layer(x)
    cut = torch.cat([torch.arange(8, 24), torch.arange(0, 8), torch.arange(24, 64)])
    assert not layer.reorder_output_rows(cut)
    assert layer.weight.view(torch.uint8).equal(weight.view(torch.uint8))
    blocks = torch.cat([torch.arange(32, 48), torch.arange(0, 32), torch.arange(48, 64)])
    assert layer.reorder_output_rows(blocks)
    assert layer.weight_scale_inv.equal(scale[[2, 0, 1, 3]])
    assert torch.equal(layer(x), before[:, blocks])
