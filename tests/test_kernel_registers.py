"""Register use of decode kernels on Hopper, read from ptxas without a GPU (benchmarks/kernel_registers.py):
the GDN's merged FP8 + bf16 input projections need no more registers than the FP8 GEMV alone at its tuned
tile, so as many of its programs fit an SM (and load their weights before the wait) as without the bf16 rows.
Compiled in a subprocess: the kernel tests' interpreter setting (TRITON_INTERPRET) must not reach it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="triton is not installed")

USAGE_WITH_AND_WITHOUT_DENSE_ROWS = """
import json
from benchmarks import kernel_registers as registers
from worker.kernels.fp8 import triton as fp8_triton

tile = registers.tuned_gemv_tile(12288, 2048)
usage = {str(dense): registers.fp8_gemv_usage(2048, tile, fp8_triton.dense_rows_tile(2048) if dense else None)
         for dense in (False, True)}
print(json.dumps(usage))
"""


def test_dense_rows_keep_the_fp8_gemv_registers():
    from triton.backends.nvidia import compiler as nvidia_compiler

    if not (Path(nvidia_compiler.__file__).parent / "bin" / "ptxas").exists():
        pytest.skip("Triton's ptxas is not installed on this platform")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", USAGE_WITH_AND_WITHOUT_DENSE_ROWS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert usage["True"]["spill_bytes"] == 0
    assert usage["True"]["registers"] <= usage["False"]["registers"], usage
