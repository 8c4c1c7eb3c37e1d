"""The served model's tokenizer, loaded with `tokenizers` alone.

`transformers.AutoTokenizer` would import torch (the router image has none), so this loads
tokenizer.json directly and applies the adjustments transformers' `TokenizersBackend` makes from
tokenizer_config.json: added tokens listed only there, named special tokens and
`split_special_tokens`. Like transformers 5, it keeps tokenizer.json's post-processor (which is what
adds a BOS token, if the model wants one).
Tests hold `encode`, `encode_chat` and `decode` equal to transformers on the same folder.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from router.chat_template import compile_chat_template, load_chat_template, render_chat
from router.detokenizer import IncrementalDetokenizer
from router.errors import InvalidArgument

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class RouterTokenizer:
    """Encode prompts, render chat templates and decode tokens for one model folder."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.special_tokens = {
            name: content for name in SPECIAL_TOKEN_ATTRIBUTES
            if (content := _token_content(config.get(name))) is not None
        }
        self._add_tokens_missing_from_json(config)
        self.tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.chat_template_source = load_chat_template(model_dir, config)
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)

    def _add_tokens_missing_from_json(self, config: dict) -> None:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        missing = []
        for _, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0])):
            if entry["content"] not in vocab:
                missing.append(AddedToken(entry["content"], special=entry.get("special", False),
                                          lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                          normalized=entry.get("normalized", True),
                                          single_word=entry.get("single_word", False)))
        named = [AddedToken(content, special=True, normalized=False)
                 for content in self.special_tokens.values() if content not in vocab]
        if missing or named:
            self.tokenizer.add_tokens(missing + named)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's vocab may be larger)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template_source is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like `AutoTokenizer.encode(text)`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Like `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`."""
        if self.chat_template_source is None:
            raise InvalidArgument("messages", "this model has no chat template; send text or token_ids instead")
        template = compile_chat_template(self.chat_template_source)
        normalized = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return render_chat(template, normalized, add_generation_prompt, self.special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """(rendered prompt, its ids), like `apply_chat_template(messages, tokenize=True)`, which encodes
        the rendered text without adding special tokens (the template wrote them)."""
        rendered = self.render_chat(messages, add_generation_prompt)
        return rendered, self.encode(rendered, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as decoding it alone gives (U+FFFD for a part of a multi-byte character)."""
        return self._token_text(token_id)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental decoder for one request's output."""
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens)
