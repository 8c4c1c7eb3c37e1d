"""Fixtures of the router tests: the tiny checkpoint's tokenizer folder and copies to vary."""

import shutil

import pytest


@pytest.fixture(scope="session")
def model_dir(checkpoint_factory):
    """The `tiny` preset: byte-level BPE trained on a corpus with CJK and emoji, ChatML template."""
    return checkpoint_factory("tiny")


@pytest.fixture
def tokenizer_copy(model_dir, tmp_path):
    """A copy of just the tokenizer files, for tests that edit tokenizer_config.json."""
    target = tmp_path / "model"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(model_dir / name, target / name)
    return target
