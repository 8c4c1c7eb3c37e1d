"""A regular (non-editable) install, as the Docker images make, holds every package and the built-in model."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed():
    roots = {"nextserve": REPO / "proto" / "nextserve", "router": REPO / "router", "worker": REPO / "worker"}
    found = {
        ".".join([name, *init.parent.relative_to(root).parts])
        for name, root in roots.items() for init in root.rglob("__init__.py")
    }
    assert found == set(SETUPTOOLS["packages"])


def test_every_data_file_ships_as_package_data():
    """The built-in model, the tuned MoE tile configs, the tokenizer corpus: whatever is not Python."""
    from worker.tools.builtin_model import ASSET_DIR, MODEL_FILES

    patterns = SETUPTOOLS["package-data"]["worker"]
    worker = REPO / "worker"
    shipped = {path for pattern in patterns for path in worker.glob(pattern)}
    data = {path for path in worker.rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert {ASSET_DIR / name for name in MODEL_FILES} <= shipped
    assert data <= shipped, sorted(str(p.relative_to(REPO)) for p in data - shipped)
