"""The tiny checkpoints are the same bytes on every machine: under each of torch's CPU paths, and
pinned, so an accidental change of the weights shows."""

import json

import numpy as np
import pytest

from tests import cpu_capabilities
from tests.test_tiny_checkpoint import file_hashes
from worker.tools.tiny_checkpoint import DTYPES, PRESETS, TINY_MODEL_NAME, tiny_model_dir, write_tiny_checkpoint
from worker.tools.tiny_weights import PortableRandom

# sha256 of `write_tiny_checkpoint(dir)` (preset tiny, seed 0, 3 shards, bfloat16, with MTP).
# A change here changes every test's weights and the built-in model: bump TINY_MODEL_NAME with it.
PINNED_TINY_WEIGHTS = {
    "model-00001-of-00003.safetensors": "a126ae1264aaf1eb270acccc3f6c0b43f63c740a0168b17e93559364af34c1a9",
    "model-00002-of-00003.safetensors": "7b4fb7d5cce761823d802a51430690d89cafdf6b954ed62de62948a61e591525",
    "model-00003-of-00003.safetensors": "333ccd8cd12b575331d1d3e31fbaca9d77519a915362b1ba9086845fb7b444a0",
}

# Writes every preset in every dtype, and in FP8, into a temporary folder; prints the CPU path and all hashes.
WRITE_ALL = """
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
from worker.tools.tiny_checkpoint import DTYPES, PRESETS, write_tiny_checkpoint
out = {"capability": torch.backends.cpu.get_cpu_capability().lower(), "hashes": {}}
with tempfile.TemporaryDirectory() as tmp:
    for preset in sorted(PRESETS):
        for dtype in sorted(DTYPES):
            path = write_tiny_checkpoint(Path(tmp) / f"{preset}-{dtype}", preset=preset, dtype=dtype)
            out["hashes"][f"{preset}/{dtype}"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                  for p in sorted(path.iterdir())}
        path = write_tiny_checkpoint(Path(tmp) / f"{preset}-fp8", preset=preset, quantize="fp8")
        out["hashes"][f"{preset}/fp8"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                          for p in sorted(path.iterdir())}
print(json.dumps(out))
"""


def test_tiny_weights_equal_the_pinned_hashes(tmp_path):
    hashes = file_hashes(write_tiny_checkpoint(tmp_path / "tiny"))
    assert {name: h for name, h in hashes.items() if name.endswith(".safetensors")} == PINNED_TINY_WEIGHTS


@pytest.fixture(scope="module")
def native_hashes(tmp_path_factory) -> dict:
    hashes = {f"{preset}/{dtype}": file_hashes(write_tiny_checkpoint(tmp_path_factory.mktemp("n") / "c", preset=preset,
                                                                     dtype=dtype))
              for preset in sorted(PRESETS) for dtype in sorted(DTYPES)}
    hashes.update({f"{preset}/fp8": file_hashes(write_tiny_checkpoint(tmp_path_factory.mktemp("n") / "c", preset=preset,
                                                                      quantize="fp8"))
                   for preset in sorted(PRESETS)})
    return hashes


@pytest.mark.parametrize("capability", sorted(cpu_capabilities.REQUIRED_FLAGS))
def test_every_preset_and_dtype_has_the_same_bytes_on_every_cpu_path(capability, native_hashes):
    if not cpu_capabilities.supported(capability):
        pytest.skip(f"this CPU cannot run torch's {capability} path")
    result = cpu_capabilities.run_under(capability, ["-c", WRITE_ALL], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(result.stdout.splitlines()[-1])
    assert written["capability"] == capability, "ATEN_CPU_CAPABILITY was not honoured"
    assert written["hashes"].keys() == native_hashes.keys()
    for key, hashes in written["hashes"].items():
        assert hashes == native_hashes[key], f"{key} differs between {capability} and {cpu_capabilities.native()}"


def test_portable_draws_have_the_documented_distributions():
    rng = PortableRandom(0)
    u = rng.uniform(100_000)
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    z = rng.normal(100_000)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02 and np.abs(z).max() <= 6.0
    assert sorted(rng.permutation(1000).tolist()) == list(range(1000))
    assert np.array_equal(PortableRandom(5).normal(10), PortableRandom(5).normal(10))
    assert not np.array_equal(PortableRandom(5).normal(10), PortableRandom(6).normal(10))


def test_a_cached_older_tiny_model_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_CACHE", str(tmp_path))
    stale = tmp_path / "builtin-tiny-v1"  # the v1 weights, cached under their old name
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = tiny_model_dir()
    assert path.name == TINY_MODEL_NAME and path != stale
    assert file_hashes(path)["model-00001-of-00003.safetensors"] == PINNED_TINY_WEIGHTS[
        "model-00001-of-00003.safetensors"]
