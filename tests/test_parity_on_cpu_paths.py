"""The parity suite against transformers passes on every CPU path torch can take, not only on this
process's: the weights are the same bytes everywhere, and no near-tie lets fp32 rounding decide."""

import pytest

from tests import cpu_capabilities

PARITY_TESTS = ["tests/test_model_vs_hf.py", "tests/test_mtp_head.py"]

RUN_CHECKED = """
import sys
import pytest, torch
expected = sys.argv[1]
assert torch.backends.cpu.get_cpu_capability().lower() == expected, "ATEN_CPU_CAPABILITY was not honoured"
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_parity_suite_passes_under(capability):
    if not cpu_capabilities.supported(capability):
        pytest.skip(f"this CPU cannot run torch's {capability} path")
    if capability == cpu_capabilities.native():
        pytest.skip(f"{capability} is this process's own path: the suite runs on it directly")
    result = cpu_capabilities.run_under(capability, ["-c", RUN_CHECKED, capability, *PARITY_TESTS], timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"under {capability}: {summary}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
