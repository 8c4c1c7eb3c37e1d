"""The training data every machine has: the running interpreter's standard library sources.

Every `*.py` under sysconfig's stdlib path except installed packages and generated tables,
de-duplicated by content (the first path in sorted order keeps a duplicated text) and sorted by path.
A library module's split comes from a stable hash of its path relative to the stdlib root, so a module
is held out on every Python version that ships it: ~3.5% `eval` (the reported figures), ~1.5% `val`
(the curve during training and the choice of the weights kept), the rest `train`. The test suites
(test/, idlelib/idle_test, ...), where the interpreter ships them, are training data only: their
repetitive asserts would flatter the held-out figures, which stay on library modules.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from worker.tools.tiny_tokenizer import ENDOFTEXT, UNUSED_VOCAB_ROWS, train_tokenizer

SPLITS = ("train", "val", "eval")
# Per mille of paths in each held-out split, by the path's hash bucket: [0, 35) eval, [35, 50) val.
EVAL_PER_MILLE, VAL_PER_MILLE = 35, 15

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_SUITE_DIRS = frozenset({"test", "tests", "idle_test"})
# pydoc's help topics: one generated dict of prose, not code.
SKIPPED_PREFIXES = ("pydoc_data/",)
# encodings' charmap codecs are 256-entry tables written by gencodec.py; kept, they would flatter accuracy.
GENERATED_MARK = "with gencodec.py"


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib root, with forward slashes
    text: str
    split: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class Corpus:
    root: Path
    files: list[SourceFile]
    skipped: dict[str, int]  # reason -> files

    def split(self, name: str) -> list[SourceFile]:
        return [f for f in self.files if f.split == name]

    def summary(self) -> dict:
        """What the report records about the data."""
        per_split = {
            name: {"files": len(self.split(name)), "bytes": sum(f.num_bytes for f in self.split(name))}
            for name in SPLITS
        }
        return {
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "stdlib_root": str(self.root),
            "files": len(self.files),
            "test_suite_files": sum(is_test_suite(f.path) for f in self.files),
            "bytes": sum(f.num_bytes for f in self.files),
            "splits": per_split,
            "skipped": dict(sorted(self.skipped.items())),
            "eval_modules": [f.path for f in self.split("eval")],
            "val_modules": [f.path for f in self.split("val")],
        }


def split_of(relative_path: str) -> str:
    if is_test_suite(relative_path):
        return "train"
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "little") % 1000
    if bucket < EVAL_PER_MILLE:
        return "eval"
    if bucket < EVAL_PER_MILLE + VAL_PER_MILLE:
        return "val"
    return "train"


def is_test_suite(relative_path: str) -> bool:
    return bool(TEST_SUITE_DIRS.intersection(relative_path.split("/")[:-1]))


def skip_reason(relative_path: str, text: str | None) -> str | None:
    parts = relative_path.split("/")
    if SKIPPED_DIRS.intersection(parts[:-1]):
        return "installed packages"
    if relative_path.startswith(SKIPPED_PREFIXES):
        return "pydoc_data (generated prose)"
    if text is None:
        return "not UTF-8"
    if GENERATED_MARK in text[:1000]:
        return "gencodec.py tables"
    if not text.strip():
        return "empty"
    return None


def load_stdlib(root: Path | None = None) -> Corpus:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skipped: dict[str, int] = {}
    seen: set[bytes] = set()
    files = []
    for relative in _python_files(root, skipped):
        data = (root / relative).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        reason = skip_reason(relative, text)
        if reason is None:
            digest = hashlib.sha256(data).digest()
            reason = "duplicate content" if digest in seen else None
            seen.add(digest)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        files.append(SourceFile(relative, text, split_of(relative)))
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    return Corpus(root, files, skipped)


def _python_files(root: Path, skipped: dict[str, int]) -> list[str]:
    """Relative paths of the *.py files, sorted; skipped directories are not entered (site-packages can hold
    tens of thousands of files), each counted once under "directories not entered"."""
    found = []
    for directory, subdirs, names in os.walk(root):
        kept = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        skipped_here = len(subdirs) - len(kept)
        if skipped_here:
            skipped["directories not entered"] = skipped.get("directories not entered", 0) + skipped_here
        subdirs[:] = kept
        relative_dir = Path(directory).relative_to(root)
        found += [(relative_dir / n).as_posix() for n in names if n.endswith(".py") and (Path(directory) / n).is_file()]
    return sorted(found)


def smoke_subset(corpus: Corpus, per_split: dict[str, int]) -> Corpus:
    """The first files of each split (by path) between 2 and 16 kB: a corpus for a CPU smoke run."""
    files = []
    for name, count in per_split.items():
        sized = [f for f in corpus.split(name) if 2_000 <= f.num_bytes <= 16_000]
        files += sized[:count]
    return Corpus(corpus.root, sorted(files, key=lambda f: f.path), dict(corpus.skipped))


def build_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """The byte-level BPE of the tiny checkpoints, trained on the train split only."""
    return train_tokenizer(vocab_size - UNUSED_VOCAB_ROWS, (f.text for f in corpus.split("train")))


def token_stream(tokenizer: Tokenizer, files: list[SourceFile]) -> torch.Tensor:
    """[N] int64: each file's tokens followed by <|endoftext|>, files in path order."""
    end = tokenizer.token_to_id(ENDOFTEXT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([f.text for f in files], add_special_tokens=False):
        ids += encoding.ids
        ids.append(end)
    return torch.tensor(ids, dtype=torch.int64)
