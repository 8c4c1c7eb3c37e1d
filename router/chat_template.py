"""Chat templates rendered the way transformers renders them, without importing transformers.

transformers imports torch when it is installed, and the router must never load torch, so this
mirrors `transformers.utils.chat_template_utils._compile_jinja_template`: an immutable sandbox
(templates come from the Hub and are untrusted code), trim_blocks and lstrip_blocks, the loop
controls extension, and the globals and filters templates rely on (`raise_exception`,
`strftime_now`, a JSON `tojson` that does not escape HTML, a restricted `dict` and `namespace`).
The tests compare our output with `AutoTokenizer.apply_chat_template` on the same folder.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.errors import InvalidArgument


def load_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    """The default template, with transformers' precedence: chat_template.jinja, then
    chat_template.json, then `chat_template` in tokenizer_config.json (a string or a list of named
    templates, of which we take "default")."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        source = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
    else:
        source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        named = {entry["name"]: entry["template"] for entry in source}
        source = named.get("default")
    return source


class _TemplateDict:
    """`dict(...)` for templates, without the attribute surface of the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore names (a path to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def render_chat(template: jinja2.Template, messages: list[dict], add_generation_prompt: bool,
                special_tokens: dict[str, str]) -> str:
    """Render `messages` like `apply_chat_template(..., tokenize=False)`; a template that refuses the
    conversation (raise_exception, e.g. "roles must alternate") becomes INVALID_ARGUMENT on messages."""
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise InvalidArgument("messages", f"the model's chat template refused them: {e}") from None
