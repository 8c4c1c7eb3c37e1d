"""The draft vocabulary of `--speculative-token-map` (SGLang's name for it): the token ids the MTP head
may propose, read from a file.

Drafting over a few tens of thousands of frequent tokens instead of the whole 151936-token vocabulary
makes the head's pass over the lm_head that much shorter (622 MB of bf16 weights at Qwen3-Next's
size, read once per draft). Verification is unchanged, so the output is the same tokens: only drafts
outside the map are lost (the head proposes the best token inside it instead).

A file is a 1-D list of distinct ids: `.pt` (a tensor or list saved by torch.save, as SGLang's hot
token maps are), `.json` (a list), or text (whitespace-separated integers).
"""

import json
from pathlib import Path

import torch

FLAG = "--speculative-token-map"


def load_token_map(path: str | Path, vocab_size: int) -> torch.Tensor:
    """-> the ids, int64, in the file's order; a clear error naming the flag and the file otherwise."""
    path = Path(path)
    try:
        ids = _read_ids(path)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{FLAG} {path}: cannot read a list of token ids ({type(e).__name__}: {e})") from None
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{FLAG} {path}: expected a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{FLAG} {path}: token ids must be integers, got {ids.dtype}")
    ids = ids.to(torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{FLAG} {path}: token ids must be in [0, {vocab_size}), got {low}..{high}")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{FLAG} {path}: token ids must be distinct")
    return ids


def _read_ids(path: Path) -> torch.Tensor:
    if path.suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return loaded if isinstance(loaded, torch.Tensor) else torch.tensor(loaded)
    text = path.read_text()
    if path.suffix == ".json":
        return torch.tensor(json.loads(text))
    return torch.tensor([int(part) for part in text.split()])
