"""Incremental detokenization of one request's output.

Decoding each token alone is wrong for byte-level BPE: a CJK character or an emoji often spans
several tokens, and a lone piece decodes to U+FFFD. `tokenizers.decoders.DecodeStream` keeps a small
window of ids and yields text only once it is complete, so a delta may be empty until the character
is whole. `finish` emits whatever the stream still holds (an incomplete character at the very end
decodes to U+FFFD, as a full decode would), so the concatenated deltas equal
`tokenizer.decode(all_ids, skip_special_tokens=...)`.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._token_ids: list[int] = []
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still incomplete)."""
        self._token_ids.append(token_id)
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception:
            # An id the tokenizer cannot decode (rows past its vocabulary); `finish` reconciles.
            text = None
        if text:
            self._emitted.append(text)
            return text
        return ""

    def finish(self) -> str:
        """The rest of the text once no more tokens will come."""
        full = self._tokenizer.decode(self._token_ids, skip_special_tokens=self._skip_special_tokens)
        emitted = "".join(self._emitted)
        if full.startswith(emitted):
            rest = full[len(emitted):]
            self._emitted.append(rest)
            return rest
        return ""
