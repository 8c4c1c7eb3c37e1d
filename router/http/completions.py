"""POST /v1/completions: the legacy completions API, in the shape of vLLM's and SGLang's servers.

`prompt` is a string, a list of strings, a list of token ids or a list of token-id lists; choice i
answers prompt i. `echo` puts the prompt in front of the text and, with `logprobs`, its tokens'
logprobs in front of the generated ones (the first prompt token's are null): what lm-eval's
loglikelihood requests read.
"""

from __future__ import annotations

from aiohttp import web

from nextserve.v1 import generation_pb2

from router.errors import InvalidArgument
from router.http.fields import INT64, Body, check_int, is_int, parse_json_object, renamed
from router.http.generation import (
    FINISH_REASONS, Envelope, choice_request_ids, prepare_prompts, respond, stop_reason,
)
from router.http.logprobs import CompletionLogprobs
from router.http.state import state_of
from router.http.request_fields import check_model, read_common, read_streaming
from router.tokenizer import RouterTokenizer
from router.validation import MAX_LOGPROBS, parse_generate_request


def read_prompts(body: Body) -> tuple[list[str | list[int]], list[str]]:
    """-> (prompts, the field name of each) from `prompt` in any of its four shapes."""
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidArgument("prompt", "is required: a string, a list of strings, token ids or lists of token ids")
    if isinstance(prompt, str):
        return [prompt], ["prompt"]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidArgument("prompt", "must be a non-empty string or a non-empty list")
    if all(is_int(item) for item in prompt):
        return [[check_int(t, f"prompt[{i}]", INT64) for i, t in enumerate(prompt)]], ["prompt"]
    texts = isinstance(prompt[0], str)
    prompts, names = [], []
    for index, item in enumerate(prompt):
        name = f"prompt[{index}]"
        if texts and isinstance(item, str):
            prompts.append(item)
        elif not texts and isinstance(item, list) and item and all(is_int(t) for t in item):
            prompts.append([check_int(t, f"{name}[{i}]", INT64) for i, t in enumerate(item)])
        else:
            raise InvalidArgument(name, "must be like the other prompts: a list of strings, a list of token ids, "
                                        "or a list of non-empty token-id lists")
        names.append(name)
    return prompts, names


def prompt_field_renamer(names: list[str]):
    """The shared validation names the prompt `text` / `token_ids[i]`; the client wrote `prompt...`."""

    def rename(error: InvalidArgument, index: int) -> InvalidArgument:
        field = error.field
        if field in ("text", "token_ids", "messages", "prompt"):
            return renamed(error, names[index])
        if field.startswith("token_ids["):
            return renamed(error, names[index] + field[len("token_ids"):])
        return error

    return rename


class CompletionChoice:
    def __init__(self, index: int, tokenizer: RouterTokenizer, prompt_token_ids: list[int], prompt_text: str,
                 echo: bool, with_logprobs: bool):
        self.index = index
        self._tokenizer = tokenizer
        self._prompt_token_ids = prompt_token_ids
        self._prompt_text = prompt_text
        self._echo = echo
        self._logprobs = CompletionLogprobs(tokenizer) if with_logprobs else None
        self._first = True
        self.text = ""
        self.finish_reason = None
        self.stop_reason = None
        self.prompt_tokens = len(prompt_token_ids)
        self.completion_tokens = 0

    def on_response(self, response) -> list[dict]:
        start = len(self._logprobs.tokens) if self._logprobs else 0
        text = response.text
        if self._first:
            self._first = False
            if self._echo:
                text = self._prompt_text + text
                if self._logprobs is not None:
                    self._logprobs.add_unscored(self._prompt_token_ids[0])
                    for logprob in response.prompt_logprobs:
                        self._logprobs.add(logprob)
        if self._logprobs is not None:
            for logprob in response.logprobs:
                self._logprobs.add(logprob)
        self.text += text
        self.completion_tokens += len(response.token_ids)
        if response.finish_reason:
            self.finish_reason = FINISH_REASONS.get(response.finish_reason)
            self.stop_reason = stop_reason(response)
            self.prompt_tokens = response.usage.prompt_tokens
            self.completion_tokens = response.usage.completion_tokens
        return [self._choice(text, self._logprobs_since(start))]

    def _logprobs_since(self, start: int) -> dict | None:
        if self._logprobs is None:
            return None
        return {key: values[start:] for key, values in self._logprobs.to_json().items()}

    def _choice(self, text: str, logprobs: dict | None) -> dict:
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason,
                "stop_reason": self.stop_reason}

    def final(self) -> dict:
        return self._choice(self.text, self._logprobs.to_json() if self._logprobs else None)


async def completions(api, request: web.Request) -> web.StreamResponse:
    body = Body(parse_json_object(await request.read()))
    check_model(body, api.served_names)
    streaming = read_streaming(body)
    if body.has("suffix"):
        raise InvalidArgument("suffix", "is not supported by this server")
    best_of = body.integer("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidArgument("best_of", f"only best_of = 1 is supported, got {best_of}")
    echo = body.boolean("echo", False)
    logprobs = body.integer("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidArgument("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    common = read_common(body)
    prompts, names = read_prompts(body)
    path = api.path
    max_prompts = path.config.max_in_flight + path.config.max_queue  # more would be refused by admission anyway
    if len(prompts) > max_prompts:
        raise InvalidArgument("prompt", f"at most {max_prompts} prompts per request on this server, got {len(prompts)}")
    limits = path.limits()
    ids = choice_request_ids(request, len(prompts))
    rename = prompt_field_renamer(names)
    specs = []
    for index, prompt in enumerate(prompts):
        generate = generation_pb2.GenerateRequest()
        generate.CopyFrom(common)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument(names[index], "must not be empty")
            generate.text = prompt
        else:
            generate.token_ids.extend(prompt)
        if logprobs is not None:
            generate.logprobs = logprobs
            if echo:
                generate.prompt_logprobs = logprobs
        generate.request_id = ids[index][1]
        try:
            specs.append(parse_generate_request(generate, limits))
        except InvalidArgument as e:
            raise rename(e, index) from None
    prepared = await prepare_prompts(path, specs, [request_id for request_id, _ in ids], limits, rename)
    choices = []
    for index, (prompt, ready) in enumerate(zip(prompts, prepared)):
        prompt_text = ""
        if echo:
            prompt_text = prompt if isinstance(prompt, str) else path.tokenizer.decode(prompt, skip_special_tokens=False)
        choices.append(CompletionChoice(index, path.tokenizer, ready.prompt_token_ids, prompt_text, echo,
                                        logprobs is not None))
    envelope = Envelope.new("cmpl", "text_completion", "text_completion", api.model_name, state_of(request).request_id)
    return await respond(path, api.metrics, request, prepared, choices, envelope, streaming)
