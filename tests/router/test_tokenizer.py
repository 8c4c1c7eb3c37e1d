"""RouterTokenizer (no transformers) must equal transformers.AutoTokenizer on the same folder."""

import json

import pytest
from transformers import AutoTokenizer

from router.errors import InvalidArgument
from router.tokenizer import RouterTokenizer

TEXTS = [
    "", "Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\r\n", "digits 1234567890 3.14",
    "世界你好，这是一个测试。", "emoji 🎉🚀👩‍👩‍👧 mixed 漢字 text", "e\u0301 composed café",  # NFC normalization
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "text<|im_end|>glued<|im_start|>", "'s 've 're I'M",
    "a" * 300, "\u00a0nbsp and \u200bzero width", "😀" * 7,
]

MESSAGES = [
    [{"role": "user", "content": "Hello 世界"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 🎉?"}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "call it"},
     {"role": "assistant", "content": "  spaced  "}, {"role": "tool", "content": "{\"ok\": \"<b>é</b>\"}"},
     {"role": "user", "content": "thanks"}],
]

# Exercises what transformers' environment provides: namespace, loop controls, raise_exception,
# tojson (no HTML escaping, non-ASCII kept), strftime_now, the generation tag, trim/lstrip blocks,
# and special tokens passed as variables.
RICH_TEMPLATE = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if ns.last_user < 0 %}{{- raise_exception('No user query found in messages.') }}{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message.role == 'system' %}{% continue %}{% endif %}
    {% if message.role == 'tool' %}
<|im_start|>user
<tool_response>{{ message.content | tojson }}{{ {'k': '<b>é</b>'} | tojson }}</tool_response><|im_end|>
    {% else %}
<|im_start|>{{ message.role }}
{% generation %}{{ message.content | trim }}{% endgeneration %}<|im_end|>
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{{ eos_token }}|{{ pad_token }}|{{ strftime_now('%Y') }}{% endif %}"""


def _pair(folder):
    return RouterTokenizer(folder), AutoTokenizer.from_pretrained(folder)


def _check_equal(ours, hf):
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    for messages in MESSAGES:
        for add_generation_prompt in (True, False):
            expected_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                  return_dict=False)
            rendered, ids = ours.encode_chat(messages, add_generation_prompt)
            assert rendered == expected_text
            assert ids == list(expected_ids)


def test_tiny_tokenizer_matches_transformers(model_dir):
    ours, hf = _pair(model_dir)
    assert ours.vocab_size == len(hf)
    _check_equal(ours, hf)


def test_qwen2_tokenizer_class_matches(tokenizer_copy):
    """Published Qwen3-Next folders name Qwen2Tokenizer, which transformers rebuilds from the vocab."""
    config_path = tokenizer_copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config))
    _check_equal(*_pair(tokenizer_copy))


def test_bos_from_the_post_processor(tokenizer_copy):
    """A model that wants a BOS token says so in tokenizer.json's post-processor; both must add it."""
    tokenizer_path = tokenizer_copy / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [1000], "tokens": ["<|endoftext|>"]}},
    }
    tokenizer_path.write_text(json.dumps(tokenizer))
    ours, hf = _pair(tokenizer_copy)
    assert ours.encode("hi")[0] == 1000
    _check_equal(ours, hf)


def test_rich_chat_template_file_matches(tokenizer_copy):
    (tokenizer_copy / "chat_template.jinja").write_text(RICH_TEMPLATE)  # takes precedence over the config's
    ours, hf = _pair(tokenizer_copy)
    assert ours.chat_template_source == RICH_TEMPLATE
    _check_equal(ours, hf)


def test_template_exception_is_invalid_argument(tokenizer_copy):
    (tokenizer_copy / "chat_template.jinja").write_text(RICH_TEMPLATE)
    with pytest.raises(InvalidArgument, match="No user query found") as error:
        RouterTokenizer(tokenizer_copy).encode_chat([{"role": "system", "content": "only a system turn"}])
    assert error.value.field == "messages"


def test_sandbox_blocks_escapes(tokenizer_copy):
    (tokenizer_copy / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidArgument):
        RouterTokenizer(tokenizer_copy).render_chat([{"role": "user", "content": "x"}])


def test_no_chat_template(tokenizer_copy):
    config_path = tokenizer_copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="no chat template"):
        RouterTokenizer(tokenizer_copy).encode_chat([{"role": "user", "content": "x"}])
