"""With NEXTSERVE_ROUTER_NORM=1 the MoE's router multiplies in the post-attention norm's launch
(kernels.fused_add_rms_norm_linear) in every MoE layer of a single-rank model, and the layers' outputs are
those of the norm and router apart."""

import torch

from tests.helpers import ModelDriver
from worker import kernels
from worker.model.loader import load_model
from worker.model.moe import SparseMoeBlock
from worker.model.qwen3_next import router_in_norm_launch


def load_with_router_norm(model_dir, value: str | None, monkeypatch):
    if value is None:
        monkeypatch.delenv("NEXTSERVE_ROUTER_NORM", raising=False)
    else:
        monkeypatch.setenv("NEXTSERVE_ROUTER_NORM", value)
    router_in_norm_launch.cache_clear()
    try:
        return load_model(model_dir, torch.float32)
    finally:
        router_in_norm_launch.cache_clear()


def test_moe_layers_route_in_the_norms_call(checkpoint_factory, monkeypatch):
    model_dir = checkpoint_factory("tiny-dense-mix", dtype="float32")
    for value in (None, "0"):
        off = load_with_router_norm(model_dir, value, monkeypatch)
        assert not any(layer.router_after_norm for layer in list(off.model.layers) + list(off.mtp.layers))
    model = load_with_router_norm(model_dir, "1", monkeypatch)
    layers = list(model.model.layers) + list(model.mtp.layers)
    moe = [isinstance(layer.mlp, SparseMoeBlock) for layer in layers]
    assert any(moe) and not all(moe)
    assert [layer.router_after_norm for layer in layers] == moe

    def run(fused: bool) -> tuple[torch.Tensor, int]:
        for layer, is_moe in zip(layers, moe):
            layer.router_after_norm = fused and is_moe
        calls = []
        real = kernels.fused_add_rms_norm_linear
        monkeypatch.setattr(kernels, "fused_add_rms_norm_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        driver = ModelDriver(model)
        logits = driver.run([driver.prefill(driver.new_sequence(), [3, 1, 4, 1, 5, 9, 2, 6])])[0]
        return logits, len(calls)

    fused_logits, fused_calls = run(True)
    plain_logits, plain_calls = run(False)
    assert (fused_calls, plain_calls) == (sum(moe[: len(model.model.layers)]), 0)
    assert torch.equal(fused_logits, plain_logits)
