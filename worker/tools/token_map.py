"""Write a draft vocabulary for `--speculative-token-map`: the most frequent token ids of some text.

    python -m worker.tools.token_map --model DIR --size 32768 --out map.pt TEXT_FILE [TEXT_FILE ...]

The text is what the server will mostly see (prompts and answers of its traffic, a corpus of the
language or code it serves). Ids are ranked by their count in it, ties to the lower id; the model's
end-of-sequence ids are always in. `.pt` (torch.save of a 1-D int64 tensor, as SGLang reads them) or
`.json` by the output's suffix.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer

from worker.config import ModelConfig


def frequent_ids(counts: Counter, size: int, always: list[int]) -> list[int]:
    """The `size` ids of `always` and then the most counted (ties to the lower id), in that order."""
    chosen = list(dict.fromkeys(always))[:size]
    taken = set(chosen)
    for token_id, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) == size:
            break
        if token_id not in taken:
            chosen.append(token_id)
            taken.add(token_id)
    return chosen


def count_tokens(tokenizer: Tokenizer, paths: list[Path]) -> Counter:
    counts = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            counts.update(tokenizer.encode(line, add_special_tokens=False).ids)
    return counts


def write(ids: list[int], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(ids))
    else:
        torch.save(torch.tensor(ids, dtype=torch.int64), out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint folder (its tokenizer.json and config)")
    parser.add_argument("--size", type=int, required=True, help="ids in the map at most (fewer if the text has fewer)")
    parser.add_argument("--out", type=Path, required=True, help=".pt or .json")
    parser.add_argument("text", type=Path, nargs="+", help="text files to count tokens in")
    args = parser.parse_args(argv)
    config = ModelConfig.from_pretrained(args.model)
    if not 0 < args.size <= config.vocab_size:
        parser.error(f"--size must be in 1..{config.vocab_size}, got {args.size}")
    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    ids = frequent_ids(count_tokens(tokenizer, args.text), args.size, list(config.eos_token_ids))
    write(ids, args.out)
    print(f"{len(ids)} token ids -> {args.out}")


if __name__ == "__main__":
    main()
