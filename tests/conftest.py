"""Shared fixtures: tiny random checkpoints written once per session by the project's own tool."""

import pytest
import torch

from worker.tools.tiny_checkpoint import PRESETS, write_tiny_checkpoint

# The presets differ in: GDN value heads per key head (2 / 1 / 2), head_dim (32 / 48 / 32),
# dk != dv (tiny), dense + MoE layers (tiny-dense-mix), partial_rotary_factor (0.25 / 0.5),
# norm_topk_prob (true / false) and explicit non-periodic layer_types (tiny-dense-mix).
MODEL_PRESETS = ["tiny", "tiny-dense-mix", "tiny-tp"]
assert set(MODEL_PRESETS) <= set(PRESETS)

torch.set_num_threads(1)  # the CI box has 2 shared cores; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """-> write(preset, dtype="float32", mtp=True, shards=3, seed=0) returning the folder; cached per args."""
    written = {}

    def write(preset: str, dtype: str = "float32", mtp: bool = True, shards: int = 3, seed: int = 0):
        key = (preset, dtype, mtp, shards, seed)
        if key not in written:
            name = f"{preset}-{dtype}-{'mtp' if mtp else 'nomtp'}-{shards}sh-s{seed}"
            written[key] = write_tiny_checkpoint(
                tmp_path_factory.mktemp(name), preset=preset, seed=seed, shards=shards, dtype=dtype, mtp=mtp
            )
        return written[key]

    return write


@pytest.fixture(scope="session", params=MODEL_PRESETS)
def fp32_checkpoint(request, checkpoint_factory):
    """An fp32 checkpoint (with MTP weights) per preset, for exactness tests."""
    return checkpoint_factory(request.param, dtype="float32")
