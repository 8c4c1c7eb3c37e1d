"""The small endpoints: /health, /v1/models, /tokenize, /detokenize and /tokenizer_info (vLLM's shapes).

/tokenize and /tokenizer_info are what lm-eval's remote tokenizer reads, so lm-eval can evaluate a
served model without a copy of its tokenizer.
"""

from __future__ import annotations

from aiohttp import web

from router.errors import InvalidArgument, Unavailable
from router.http.chat import read_messages
from router.http.fields import Body, parse_json_object
from router.http.request_fields import check_model
from router.validation import Prompt, parse_chat_messages
from router.workers import NO_WORKER_READY


def _max_model_len(api) -> int | None:
    try:
        return api.path.pool.request_limits()[1]
    except Unavailable:
        return None


async def health(api, request: web.Request) -> web.Response:
    """200 while a worker group is ready (and the router is not draining), else 503."""
    if not api.num_ready:
        raise Unavailable(NO_WORKER_READY)
    return web.json_response({"status": "ok", "ready_workers": api.num_ready})


def _model_card(api) -> dict:
    card = {"id": api.model_name, "object": "model", "created": api.started, "owned_by": "nextserve",
            "root": api.path.config.model}
    max_model_len = _max_model_len(api)
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


async def list_models(api, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(api)]})


async def get_model(api, request: web.Request) -> web.Response:
    check_model(Body({"model": request.match_info["model"]}), api.served_names)
    return web.json_response(_model_card(api))


async def tokenize(api, request: web.Request) -> web.Response:
    """{"prompt": text, "add_special_tokens": true} or {"messages": [...], "add_generation_prompt": true}
    -> {"count", "max_model_len", "tokens", "token_strs"}."""
    body = Body(parse_json_object(await request.read()))
    check_model(body, api.served_names)
    if body.has("prompt") == body.has("messages"):
        raise InvalidArgument("prompt", "give exactly one of prompt and messages")
    if body.has("prompt"):
        text = body.string("prompt")
        _, token_ids = await api.path.encode(Prompt(text=text), body.boolean("add_special_tokens", True))
    else:
        messages = parse_chat_messages(read_messages(body))
        prompt = Prompt(messages=messages, add_generation_prompt=body.boolean("add_generation_prompt", True))
        _, token_ids = await api.path.encode(prompt)
    token_strs = None
    if body.boolean("return_token_strs", False):
        token_strs = [api.path.tokenizer.token_text(token_id) for token_id in token_ids]
    return web.json_response({"count": len(token_ids), "max_model_len": _max_model_len(api), "tokens": token_ids,
                              "token_strs": token_strs})


async def detokenize(api, request: web.Request) -> web.Response:
    """{"tokens": [ids]} -> {"prompt": text}."""
    body = Body(parse_json_object(await request.read()))
    check_model(body, api.served_names)
    if not isinstance(body.get("tokens"), list):
        raise InvalidArgument("tokens", "is required: a list of token ids")
    tokenizer = api.path.tokenizer
    token_ids = body.integers("tokens")
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < tokenizer.vocab_size:
            raise InvalidArgument(f"tokens[{index}]", f"{token_id} is outside the tokenizer's vocabulary "
                                                      f"[0, {tokenizer.vocab_size})")
    return web.json_response({"prompt": tokenizer.decode(token_ids, skip_special_tokens=False)})


async def tokenizer_info(api, request: web.Request) -> web.Response:
    """The tokenizer's named special tokens and chat template."""
    tokenizer = api.path.tokenizer
    info = {**tokenizer.special_tokens, "chat_template": tokenizer.chat_template_source,
            "model_max_length": _max_model_len(api), "vocab_size": tokenizer.vocab_size}
    return web.json_response(info)
