"""The kernel switch: CUDA tensors go to the Triton kernels unless the references are forced."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import gdn_inputs, generator
from worker import kernels
from worker.kernels import gated_delta_rule as ref

tk = pytest.importorskip("worker.kernels.triton_gated_delta_rule", reason="triton is not installed")


@pytest.fixture
def backend():
    yield kernels.set_kernel_backend
    kernels.set_kernel_backend("auto")


def recurrent_args(device):
    q, k, v, g, beta = gdn_inputs((3, 2), 1, 2, 16, 16, generator(0, device), device)
    states = torch.randn(3, 2, 2, 16, 16, device=device)
    idx = torch.tensor([2, 0, 1], device=device)
    return dict(q=q, k=k, v=v, g=g, beta=beta, ssm_states=states, state_indices=idx, num_accepted=idx * 0 + 1)


def calls(monkeypatch, module, name):
    seen = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: seen.append(module.__name__) or original(*a, **kw))
    return seen


@pytest.mark.parametrize("name,device_is_cuda,expected", [
    ("auto", False, "reference"), ("torch", False, "reference"), ("triton", False, "triton"),
    ("auto", True, "triton"), ("torch", True, "reference"),
])
def test_backend_selects_implementation(backend, monkeypatch, name, device_is_cuda, expected):
    if device_is_cuda and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if name == "triton" and not device_is_cuda and HAS_CUDA:
        pytest.skip("Triton kernels on CPU tensors need the interpreter, which is off where there is a GPU")
    device = "cuda" if device_is_cuda else "cpu"
    seen_ref = calls(monkeypatch, ref, "fused_recurrent_gated_delta_rule")
    seen_triton = calls(monkeypatch, tk, "fused_recurrent_gated_delta_rule")
    backend(name)
    kernels.fused_recurrent_gated_delta_rule(**recurrent_args(device))
    assert (seen_ref, seen_triton) == (([ref.__name__], []) if expected == "reference" else ([], [tk.__name__]))


def test_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="auto, torch, triton"):
        backend("cuda")
    assert kernels.get_kernel_backend() == "auto"


@pytest.mark.parametrize("name,device_is_cuda,expected", [
    ("auto", False, "reference"), ("torch", False, "reference"), ("triton", False, "triton"),
    ("auto", True, "triton"), ("torch", True, "reference"),
])
def test_paged_attention_backend(backend, monkeypatch, name, device_is_cuda, expected):
    if device_is_cuda and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if name == "triton" and not device_is_cuda and HAS_CUDA:
        pytest.skip("Triton kernels on CPU tensors need the interpreter, which is off where there is a GPU")
    attn_ref = importlib.import_module("worker.kernels.paged_attention")
    attn_tk = importlib.import_module("worker.kernels.triton_paged_attention")
    seen = {impl: [calls(monkeypatch, module, op) for op in ("reshape_and_cache", "paged_attention")]
            for impl, module in (("reference", attn_ref), ("triton", attn_tk))}
    device = "cuda" if device_is_cuda else "cpu"
    backend(name)
    k_cache = torch.zeros(2, 16, 1, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(3, 1, 16, device=device)
    kernels.reshape_and_cache(kv, kv, k_cache, v_cache, torch.tensor([0, 1, 2], device=device))
    kernels.paged_attention(torch.randn(3, 2, 16, device=device), k_cache, v_cache,
                            torch.tensor([0, 3], dtype=torch.int32, device=device),
                            torch.tensor([3], dtype=torch.int32, device=device),
                            torch.zeros(1, 1, dtype=torch.int32, device=device), 0.25)
    assert {impl: [len(ops) for ops in lists] for impl, lists in seen.items()} == {
        impl: [1, 1] if impl == expected else [0, 0] for impl in seen}


@pytest.mark.parametrize("name,device_is_cuda,expected", [
    ("auto", False, "reference"), ("torch", False, "reference"), ("triton", False, "triton"),
    ("auto", True, "triton"), ("torch", True, "reference"),
])
def test_moe_backend(backend, monkeypatch, name, device_is_cuda, expected):
    if device_is_cuda and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if name == "triton" and not device_is_cuda and HAS_CUDA:
        pytest.skip("Triton kernels on CPU tensors need the interpreter, which is off where there is a GPU")
    moe_ref = importlib.import_module("worker.kernels.moe.reference")
    moe_tk = importlib.import_module("worker.kernels.moe.triton")
    seen = {impl: [calls(monkeypatch, module, op) for op in ("select_experts", "fused_moe")]
            for impl, module in (("reference", moe_ref), ("triton", moe_tk))}
    device = "cuda" if device_is_cuda else "cpu"
    backend(name)
    x = torch.randn(3, 16, device=device)
    weights, ids = kernels.select_experts(torch.randn(3, 4, device=device), 2, True)
    kernels.fused_moe(x, torch.randn(4, 32, 16, device=device), torch.randn(4, 16, 16, device=device), weights, ids)
    assert {impl: [len(ops) for ops in lists] for impl, lists in seen.items()} == {
        impl: [1, 1] if impl == expected else [0, 0] for impl in seen}
