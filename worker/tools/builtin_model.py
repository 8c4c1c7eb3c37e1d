"""The built-in model: what `serve`, `generate` and `LLM()` run when no model is given.

A small Qwen3-Next (Gated DeltaNet, gated attention, sparse MoE with a shared expert) with a trained MTP
head, trained on the Python standard library by `worker/tools/train_builtin.py`. The folder ships in
the package (worker/assets/<name>, with its train_report.json) and is copied into the cache on first
use, so a served path is stable and writable tooling never touches the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The name changes whenever the weights do; a cache holding another version is left alone, never served.
BUILTIN_MODEL_NAME = "builtin-code-v2"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / BUILTIN_MODEL_NAME
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "train_report.json")


def cache_root() -> Path:
    return Path(os.environ.get("NEXTSERVE_CACHE") or Path.home() / ".cache" / "nextserve")


def publish_atomically(name: str, write) -> Path:
    """cache_root()/name, made once by write(staging_dir) into a temporary folder that is then renamed
    into place: readers never see a half-written folder, and concurrent writers keep the first copy."""
    root = cache_root()
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(staging, target)
    except OSError:
        # Another process renamed its copy into place first; theirs is as good as ours.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def builtin_model_dir() -> Path:
    """The built-in model's folder in the cache, copied there from the package on first use."""
    missing = [name for name in MODEL_FILES if not (ASSET_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the built-in model's files {missing} are missing from {ASSET_DIR}")

    def copy(staging: Path) -> None:
        for name in MODEL_FILES:
            shutil.copyfile(ASSET_DIR / name, staging / name)

    return publish_atomically(BUILTIN_MODEL_NAME, copy)
