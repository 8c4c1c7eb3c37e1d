"""Logprobs in the two OpenAI shapes, from the TokenLogprob messages of the request path.

Completions (the legacy shape lm-eval reads): parallel lists `tokens`, `token_logprobs`,
`top_logprobs` (a {token text: logprob} dict per position, the chosen token included, as OpenAI
documents) and `text_offset`; with `echo` they start with the prompt, whose first token has null
entries (nothing predicts it). Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
"""

from __future__ import annotations

from nextserve.v1 import common_pb2
from router.tokenizer import RouterTokenizer

MIN_LOGPROB = -9999.0  # instead of -inf, which JSON cannot carry (vLLM does the same)


def _finite(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


class CompletionLogprobs:
    """The completions `logprobs` object of one choice (or of one streamed chunk)."""

    def __init__(self, tokenizer: RouterTokenizer, text_offset: int = 0):
        self._tokenizer = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []
        self._offset = text_offset

    @property
    def next_offset(self) -> int:
        return self._offset

    def add_unscored(self, token_id: int) -> None:
        """The prompt's first token."""
        self._append(self._tokenizer.token_text(token_id), None, None)

    def add(self, logprob: common_pb2.TokenLogprob) -> None:
        text = self._tokenizer.token_text(logprob.token_id)
        top: dict[str, float] = {}
        for entry in logprob.top:  # most likely first; a text two ids share keeps the likelier
            top.setdefault(entry.text or self._tokenizer.token_text(entry.token_id), _finite(entry.logprob))
        top.setdefault(text, _finite(logprob.logprob))
        self._append(text, _finite(logprob.logprob), top)

    def _append(self, text: str, logprob: float | None, top: dict | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self._offset)
        self._offset += len(text)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: RouterTokenizer, logprobs) -> list[dict]:
    """The `logprobs.content` entries of some generated tokens."""
    content = []
    for logprob in logprobs:
        entry = _chat_token(tokenizer.token_text(logprob.token_id), logprob.logprob)
        entry["top_logprobs"] = [_chat_token(top.text or tokenizer.token_text(top.token_id), top.logprob)
                                 for top in logprob.top]
        content.append(entry)
    return content
