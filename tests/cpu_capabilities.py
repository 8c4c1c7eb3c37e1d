"""Which of torch's CPU code paths (ATEN_CPU_CAPABILITY) this machine can run, for tests that repeat
work under each one in a subprocess and compare."""

import os
import subprocess
import sys
from pathlib import Path

import torch

# The /proc/cpuinfo flags torch requires before it dispatches to a path (aten DispatchStub.cpp).
REQUIRED_FLAGS = {
    "default": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"},
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def supported(capability: str) -> bool:
    return REQUIRED_FLAGS[capability] <= cpu_flags()


def native() -> str:
    """The path this process runs on, as ATEN_CPU_CAPABILITY spells it ("avx512", "default", ...)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def run_under(capability: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python argv...` with torch forced onto `capability`, from the repository root."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
