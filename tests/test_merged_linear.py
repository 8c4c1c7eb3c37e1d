"""MergedColumnLinear: column-parallel projections of one input multiplied as one GEMM once loaded."""

import torch

from worker.config import Fp8Config
from worker.kernels.fp8.quant import quantize_block_fp8
from worker.model.layers.linear import ColumnParallelLinear, MergedColumnLinear


def _linears(rows, in_features=32, bias=False, quant=None):
    parts = []
    for i, n in enumerate(rows):
        layer = ColumnParallelLinear(in_features, n, bias, quant_config=quant, prefix=f"p{i}")
        values = torch.arange(n * in_features, dtype=torch.float32).reshape(n, in_features).sin() / 4
        if quant is None:
            layer.weight.data.copy_(values)
        else:
            layer.weight.data, layer.weight_scale_inv.data = quantize_block_fp8(values, quant.block)
        if bias:
            layer.bias.data.copy_(torch.arange(n, dtype=torch.float32) / 8)
        parts.append(layer)
    return parts


def _inputs(in_features=32):
    return (torch.arange(3 * in_features, dtype=torch.float32).reshape(3, in_features) / 7).cos()


def test_outputs_equal_the_parts_and_parameters_become_views():
    parts = _linears([8, 4, 4], bias=True)
    x = _inputs()
    alone = [p(x) for p in parts]
    merged = MergedColumnLinear.of(parts)
    assert merged is not None and merged.weight.shape == (16, 32)
    for part, got, want in zip(parts, merged(x), alone):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert part.weight.untyped_storage().data_ptr() == merged.weight.untyped_storage().data_ptr()
    parts[1].weight.data.zero_()  # a part written in place is the merged weight written
    assert torch.count_nonzero(merged(x)[1] - parts[1].bias) == 0
    assert not any(name.startswith("weight") for name, _ in merged.named_parameters())
    assert "weight" not in merged.state_dict()


def test_fp8_parts_merge_in_whole_blocks_only():
    quant = Fp8Config(weight_block_size=(16, 16))
    parts = _linears([32, 16, 16], quant=quant)
    x = _inputs()
    alone = [p(x) for p in parts]
    merged = MergedColumnLinear.of(parts)
    assert merged is not None and merged.weight_scale_inv.shape == (4, 2)
    for got, want in zip(merged(x), alone):
        assert torch.equal(got, want)  # the reference dequantises per row: same rows, same bits
    assert MergedColumnLinear.of(_linears([32, 8], quant=quant)) is None  # 8 rows: part of a block


def test_parts_of_different_kinds_stay_apart():
    quant = Fp8Config(weight_block_size=(16, 16))
    assert MergedColumnLinear.of(_linears([16], quant=quant) + _linears([16])) is None
    assert MergedColumnLinear.of(_linears([16], bias=True) + _linears([16])) is None
