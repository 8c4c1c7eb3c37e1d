"""benchmarks/tune_fp8.py --tp: the shards it tunes are the ones the model makes at that size (read off
the model built on the meta device), and a size that would split an FP8 block is refused by name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tune_fp8 = pytest.importorskip("benchmarks.tune_fp8", reason="triton is not installed")


def test_rank_shapes_at_tp_1_and_2():
    shapes, inter = tune_fp8.rank_shapes(1)
    assert shapes == {"gdn.in_proj_qkvz": (12288, 2048), "gdn.out_proj": (2048, 4096), "attn.q_proj": (8192, 2048),
                      "attn.k_proj": (512, 2048), "attn.qkv_proj": (9216, 2048), "attn.o_proj": (2048, 4096)}
    assert inter == 512
    shapes, inter = tune_fp8.rank_shapes(2)
    assert shapes == {"gdn.in_proj_qkvz": (6144, 2048), "gdn.out_proj": (2048, 2048), "attn.q_proj": (4096, 2048),
                      "attn.k_proj": (256, 2048), "attn.qkv_proj": (4608, 2048), "attn.o_proj": (2048, 2048)}
    assert inter == 256


def test_a_size_that_splits_a_block_is_refused():
    with pytest.raises(ValueError, match="mlp"):
        tune_fp8.rank_shapes(8)  # the experts' 512 rows / 8 = 64, half a 128 block
