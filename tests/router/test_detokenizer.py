"""Incremental detokenization: deltas concatenate to the full decode, even mid-character."""

import random

import pytest

from router.tokenizer import RouterTokenizer

MULTIBYTE_TEXTS = ["世界你好", "🎉🚀 party", "漢字とかな", "naïve café ☕", "👩‍👩‍👧 family"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return RouterTokenizer(model_dir)


def _stream(tokenizer, ids, skip_special_tokens):
    detokenizer = tokenizer.detokenizer(skip_special_tokens)
    deltas = [detokenizer.push(token_id) for token_id in ids]
    return deltas, detokenizer.finish()


def test_split_characters_wait_until_complete(tokenizer):
    num_split = 0
    for text in MULTIBYTE_TEXTS:
        ids = tokenizer.encode(text)
        deltas, tail = _stream(tokenizer, ids, True)
        assert "".join(deltas) + tail == text == tokenizer.decode(ids)
        assert "\ufffd" not in "".join(deltas)  # never a broken half-character on the wire
        # A token that holds only part of a character yields nothing until the character completes.
        num_split += sum(1 for token_id, delta in zip(ids, deltas)
                         if delta == "" and "\ufffd" in tokenizer.token_text(token_id))
    assert num_split > 0, "the tiny tokenizer should split some CJK/emoji characters over tokens"


def test_known_split_character(tokenizer):
    ids = tokenizer.encode("世")
    assert len(ids) >= 2 and all("\ufffd" in tokenizer.token_text(i) for i in ids)
    deltas, tail = _stream(tokenizer, ids, True)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "世" and tail == ""


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_concatenate_to_decode(tokenizer, skip_special_tokens):
    """Random ids include special tokens, unfinished characters at the end and ids past the
    tokenizer's vocabulary (the model's vocab is larger); the deltas must still add up."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(0, 1024) for _ in range(rng.randrange(1, 24))]
        deltas, tail = _stream(tokenizer, ids, skip_special_tokens)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens)


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi<|im_end|>there")
    assert "".join(_stream(tokenizer, ids, True)[0]) == "hithere"
    assert "".join(_stream(tokenizer, ids, False)[0]) == "hi<|im_end|>there"
