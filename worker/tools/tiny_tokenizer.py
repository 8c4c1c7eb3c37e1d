"""The tiny checkpoints' tokenizer: a byte-level BPE like Qwen's, trained on corpus.txt, with ChatML
special tokens and chat template (what transformers' AutoTokenizer and the router both load)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Like the real checkpoints, config.vocab_size leaves unused rows past the tokenizer's last id.
UNUSED_VOCAB_ROWS = 21

# The pre-tokenizer regex of Qwen2/Qwen3 tokenizers (digits are split one by one).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

def train_tokenizer(total_vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """Byte-level BPE like Qwen's, with the special tokens appended after the merges; trained on `texts`
    (default: the lines of corpus.txt)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=total_vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        # The full byte alphabet, so characters absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    if texts is None:
        texts = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for token in SPECIAL_TOKENS
    ])
    return tokenizer


def build_tokenizer_config(token_ids: dict[str, int], model_max_length: int) -> dict:
    added_tokens = {
        str(token_ids[token]): {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens,
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer(out_dir: Path, preset_config: dict) -> dict[str, int]:
    tokenizer = train_tokenizer(preset_config["vocab_size"] - UNUSED_VOCAB_ROWS)
    return save_tokenizer(tokenizer, out_dir, preset_config)


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_config: dict) -> dict[str, int]:
    """tokenizer.json and tokenizer_config.json (ChatML template) -> the special tokens' ids."""
    if tokenizer.get_vocab_size() > model_config["vocab_size"]:
        raise ValueError("tokenizer is larger than the model vocabulary")
    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = build_tokenizer_config(token_ids, model_config["max_position_embeddings"])
    write_json(out_dir / "tokenizer_config.json", config)
    return token_ids


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
