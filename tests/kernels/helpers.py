"""Inputs and checks shared by the kernel tests."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

PAD = -1


def generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, gen: torch.Generator, device, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)


def gdn_inputs(lead: tuple, heads: int, v_heads: int, dk: int, dv: int, gen, device, dtype=torch.float32):
    """q, k [*lead, H, dk]; v [*lead, HV, dv] in dtype; g <= 0 and beta in (0, 1) [*lead, HV] in fp32."""
    q = randn(*lead, heads, dk, gen=gen, device=device, dtype=dtype)
    k = randn(*lead, heads, dk, gen=gen, device=device, dtype=dtype)
    v = randn(*lead, v_heads, dv, gen=gen, device=device, dtype=dtype)
    g = F.logsigmoid(randn(*lead, v_heads, gen=gen, device=device) + 2.0)  # decay ~0.5..1
    beta = randn(*lead, v_heads, gen=gen, device=device).sigmoid()
    return q, k, v, g, beta


class LaunchSpy:
    """Stands in for a jitted kernel (monkeypatch it in): each launch's grid and keyword arguments are recorded
    in `launches`, then the kernel runs."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch

    @property
    def grids(self) -> list[tuple]:
        return [grid for grid, _ in self.launches]


def verify_batch(k_spec: int, extra_rows: int, gen, device) -> tuple[list[int], list[int], int]:
    """(num_accepted of each sequence: every value in 1..1+k, then extra_rows random ones; a distinct slot group
    for each out of one more than there are, so one group is nobody's; the row where a PAD row goes)."""
    q_len = 1 + k_spec
    accepted = list(range(1, q_len + 1)) + torch.randint(1, q_len + 1, (extra_rows,), generator=gen,
                                                         device=device).tolist()
    rows = len(accepted)
    groups = torch.randperm(rows + 1, generator=gen, device=device)[:rows].tolist()
    return accepted, groups, rows // 2


def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_rel_close(actual, expected, tol: float, what: str):
    """‖actual − expected‖ / ‖expected‖ under tol; NaN (an unwritten element) never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = torch.isnan(actual) & ~torch.isnan(expected)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements left unwritten (NaN), first at {bad.nonzero()[0].tolist()}"
    keep = ~torch.isnan(expected)
    err = rel_error(actual[keep], expected[keep])
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def assert_unchanged(after, before, what: str):
    torch.testing.assert_close(after, before, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def tolerance(dtype: torch.dtype) -> float:
    """fp32 inputs: fp32 arithmetic (tf32x3 products on the GPU); bf16: bf16 operands and outputs."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def refused_split_build(split: bool, device: str):
    """The split prepare kernels at fp32 / small K (the CPU tests' shapes): checked against the reference
    in the interpreter; on CUDA those builds are wrong, so the launcher refuses them (chunk_prepare)."""
    if split and device == "cuda":
        return pytest.raises(ValueError, match="split prepare kernels are not built right on CUDA")
    return contextlib.nullcontext()
