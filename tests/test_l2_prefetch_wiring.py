"""Which weights each layer prefetches into L2 (worker.model.layers.prefetch), and when: the token
mixer after its input projection asks for its output projection and the router, the MoE (level 2)
for the next layer's input projections. The wiring registers no module twice."""

import pytest
import torch

from tests.helpers import ModelDriver
from worker import kernels
from worker.model import loader
from worker.model.layers import prefetch


def _load_with_level(monkeypatch, model_dir, level: str):
    monkeypatch.setenv("NEXTSERVE_L2_PREFETCH", level)
    prefetch.prefetch_level.cache_clear()
    try:
        return loader.load_model(model_dir, torch.float32)
    finally:
        prefetch.prefetch_level.cache_clear()


def _ids(tensors) -> list[int]:
    return [id(t) for t in tensors]


def _record_prefetches(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "prefetch_l2", lambda *tensors: seen.append(tensors))
    return seen


def test_bad_level_is_refused(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_L2_PREFETCH", "yes")
    prefetch.prefetch_level.cache_clear()
    try:
        with pytest.raises(ValueError, match="NEXTSERVE_L2_PREFETCH must be 0, 1 or 2"):
            prefetch.prefetch_level()
    finally:
        prefetch.prefetch_level.cache_clear()


@pytest.mark.parametrize("level", ["0", "1", "2"])
def test_each_layer_prefetches_the_weights_it_reads_next(monkeypatch, checkpoint_factory, level):
    model_dir = checkpoint_factory("tiny", dtype="bfloat16", fp8_block_size=128)
    model = _load_with_level(monkeypatch, model_dir, level)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) and not any("prefetch" in name for name in names)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        mixer = layer.token_mixer
        out_proj = mixer.out_proj if layer.layer_type == "linear_attention" else mixer.o_proj
        wanted = [] if level == "0" else [out_proj.weight, out_proj.weight_scale_inv, layer.mlp.gate.weight]
        assert _ids(prefetch.weights_read(mixer.prefetch_after_projection)) == _ids(wanted)
        after = [] if level != "2" or i + 1 == len(layers) else [layers[i + 1].token_mixer]
        assert layer.mlp.prefetch_after_router == after
    gdn = next(layer.linear_attn for layer in layers if layer.layer_type == "linear_attention")
    # The published FP8 layout keeps in_proj_ba in bf16: two GEMVs, three tensors read.
    assert _ids(prefetch.weights_read(gdn.input_projections_read())) == _ids(
        [gdn.in_proj_qkvz.weight, gdn.in_proj_qkvz.weight_scale_inv, gdn.in_proj_ba.weight])


def test_forward_prefetches_in_layer_order(monkeypatch, checkpoint_factory):
    model = _load_with_level(monkeypatch, checkpoint_factory("tiny", dtype="float32"), "2")
    driver = ModelDriver(model)
    seen = _record_prefetches(monkeypatch)
    driver.run([driver.prefill(driver.new_sequence(), [1, 2, 3, 4, 5])])
    expected = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        mixer = layer.token_mixer
        out_proj = mixer.out_proj if layer.layer_type == "linear_attention" else mixer.o_proj
        expected.append([out_proj.weight, layer.mlp.gate.weight])
        if i + 1 < len(layers):
            expected.append(prefetch.weights_read(layers[i + 1].token_mixer.input_projections_read()))
    assert [_ids(tensors) for tensors in seen] == [_ids(tensors) for tensors in expected]
    gdn = next(layer.linear_attn for layer in layers if layer.layer_type == "linear_attention")
    assert _ids(prefetch.weights_read(gdn.input_projections_read())) == [id(gdn.projections.weight)]  # one GEMM
