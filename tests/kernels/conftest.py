"""Kernel tests: the Triton kernels against their torch references.

With a GPU the kernels run compiled on CUDA tensors; without one they run through Triton's
interpreter on CPU tensors, which needs TRITON_INTERPRET=1 before any kernel module is imported.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element they fail to write shows up."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
    from worker.kernels import (triton_causal_conv1d, triton_gated_delta_rule, triton_gated_delta_rule_chunked,
                                triton_gated_delta_rule_wy, triton_paged_attention)

    def empty_nan(like, shape=None, dtype=None):
        return torch.full(like.shape if shape is None else shape, float("nan"), dtype=dtype or like.dtype,
                          device=like.device)

    monkeypatch.setattr(triton_gated_delta_rule, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_causal_conv1d, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_gated_delta_rule_chunked, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_gated_delta_rule_wy, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_paged_attention, "_empty_output", empty_nan)
    from worker.kernels import triton_add_rms_norm, triton_one_shot_add_rms_norm, triton_qk_norm_rope
    from worker.kernels.moe import triton as triton_moe

    monkeypatch.setattr(triton_qk_norm_rope, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_add_rms_norm, "_empty_output", empty_nan)
    monkeypatch.setattr(triton_one_shot_add_rms_norm, "_empty_output", empty_nan)

    monkeypatch.setattr(triton_moe, "_empty_output", empty_nan)
    from worker.kernels.fp8 import triton as triton_fp8

    monkeypatch.setattr(triton_fp8, "_empty_output", empty_nan)
    from worker.kernels import triton_gated_rms_norm

    monkeypatch.setattr(triton_gated_rms_norm, "_empty_output", empty_nan)
    from worker.kernels import triton_linear

    monkeypatch.setattr(triton_linear, "_empty_output", lambda shape, like: empty_nan(like, shape))
