"""Shared fixtures: tiny random checkpoints written once per session by the project's own tool."""

import math

import numpy as np
import pytest
import torch

from worker.tools.tiny_checkpoint import PRESETS, write_tiny_checkpoint
from worker.tools.tiny_weights import PortableRandom, distinct_uniform, normal, tensor_seed

# The presets differ in: GDN value heads per key head (2 / 1 / 2), head_dim (32 / 48 / 32),
# dk != dv (tiny), dense + MoE layers (tiny-dense-mix), partial_rotary_factor (0.25 / 0.5),
# norm_topk_prob (true / false) and explicit non-periodic layer_types (tiny-dense-mix).
MODEL_PRESETS = ["tiny", "tiny-dense-mix", "tiny-tp"]
assert set(MODEL_PRESETS) <= set(PRESETS)

torch.set_num_threads(1)  # the CI box has 2 shared cores; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """-> write(preset, dtype="float32", mtp=True, shards=3, seed=0, fp8_block_size=None) returning the folder;
    cached per args. fp8_block_size: an FP8 checkpoint (`--quantize fp8`) with blocks of that side."""
    written = {}

    def write(preset: str, dtype: str = "float32", mtp: bool = True, shards: int = 3, seed: int = 0,
              fp8_block_size: int | None = None):
        key = (preset, dtype, mtp, shards, seed, fp8_block_size)
        if key not in written:
            name = f"{preset}-{dtype}-{'mtp' if mtp else 'nomtp'}-{shards}sh-s{seed}"
            if fp8_block_size:
                name += f"-fp8b{fp8_block_size}"
            written[key] = write_tiny_checkpoint(
                tmp_path_factory.mktemp(name), preset=preset, seed=seed, shards=shards, dtype=dtype, mtp=mtp,
                quantize="fp8" if fp8_block_size else None, fp8_block_size=fp8_block_size or 128,
            )
        return written[key]

    return write


@pytest.fixture(scope="session", params=MODEL_PRESETS)
def fp32_checkpoint(request, checkpoint_factory):
    """An fp32 checkpoint (with MTP weights) per preset, for exactness tests."""
    return checkpoint_factory(request.param, dtype="float32")


def _fill_portably_(model: torch.nn.Module, seed: int) -> None:
    """Replace every weight with draws that are the same bytes on every CPU (HF's init and torch.randn
    are not) and move them away from HF's constants (constant norms would hide convention errors)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape, rng = tuple(p.shape), PortableRandom(tensor_seed(seed, name))
            if name.endswith("A_log"):
                values = distinct_uniform(0.0, 2.75)(shape, rng)  # A in [1, 15.6], one value per head
            elif p.dim() == 1:
                base = p[0].item()
                assert bool((p == base).all()), f"{name}: HF's init is not a constant"
                values = normal(0.1, mean=base)(shape, rng)
            else:
                values = normal(0.5 / math.sqrt(p.shape[-1]))(shape, rng)
            p.copy_(torch.from_numpy(values.astype(np.float32)))


@pytest.fixture(scope="session", params=["qwen3_5_moe_text", "qwen3_5_text"])
def qwen3_5_checkpoint(request, tmp_path_factory):
    """A Qwen3.5 text checkpoint (four separate GDN projections) written by HF save_pretrained.
    The project's tool writes only Qwen3-Next, so this one is an HF model refilled with portable draws."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=24, max_position_embeddings=1024)
    if request.param == "qwen3_5_moe_text":
        config = Qwen3_5MoeTextConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, **common)
        model = Qwen3_5MoeForCausalLM(config)
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(intermediate_size=96, **common))
    _fill_portably_(model, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # logits with a spread like the Qwen3-Next presets
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    return out
