"""Turns one request's engine deltas into the GenerateResponse messages the client reads.

Per delta: its token ids, their text (incrementally detokenized, with stop-string hold-back) and
their logprobs with token texts (and on the first, the prompt's logprobs if asked for). The last message adds the finish reason, the matched stop string or
token, usage and speculative statistics. When a stop string completes, tokens after the one that
completed it are dropped and the caller aborts the request on the worker.
"""

from __future__ import annotations

from nextserve.v1 import common_pb2, engine_pb2, generation_pb2
from router.stop_strings import StopMatch, StopStringMatcher
from router.tokenizer import RouterTokenizer


class ResponseBuilder:
    def __init__(self, request_id: str, tokenizer: RouterTokenizer, stop: tuple[str, ...],
                 skip_special_tokens: bool, min_tokens: int, prompt_tokens: int):
        self.request_id = request_id
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens)
        self._stops = StopStringMatcher(stop)
        self._min_tokens = min_tokens
        self._prompt_tokens = prompt_tokens
        self.num_completion_tokens = 0
        self.finished = False
        self._speculative: common_pb2.SpeculativeStats | None = None

    def on_delta(self, delta: engine_pb2.RequestDelta) -> generation_pb2.GenerateResponse:
        """The message for this delta; `finished` is True once it is the last one."""
        response = generation_pb2.GenerateResponse(request_id=self.request_id)
        for logprob in delta.prompt_logprobs:  # the first delta's, when asked for
            response.prompt_logprobs.append(self._with_texts(logprob))
        logprobs = delta.logprobs if len(delta.logprobs) == len(delta.token_ids) else None
        texts: list[str] = []
        match: StopMatch | None = None
        for index, token_id in enumerate(delta.token_ids):
            self.num_completion_tokens += 1
            response.token_ids.append(token_id)
            if logprobs is not None:
                response.logprobs.append(self._with_texts(logprobs[index]))
            released = self._stops.push(self._detokenizer.push(token_id), self._can_stop)
            if isinstance(released, StopMatch):
                match = released
                texts.append(released.text_before)
                break
            texts.append(released)
        if delta.HasField("speculative"):
            self._speculative = delta.speculative
        if match is None and delta.finish_reason:
            match = self._finish_text(texts)
        if match is not None or delta.finish_reason:
            self._finish(response, delta, match)
        response.text = "".join(texts)
        return response

    @property
    def _can_stop(self) -> bool:
        """Stop strings end a request only once min_tokens are out (as vLLM does)."""
        return self.num_completion_tokens >= self._min_tokens

    def _finish_text(self, texts: list[str]) -> StopMatch | None:
        """The tail the detokenizer still held, checked for stop strings, then the held-back text."""
        released = self._stops.push(self._detokenizer.finish(), self._can_stop)
        if isinstance(released, StopMatch):
            texts.append(released.text_before)
            return released
        texts.append(released)
        texts.append(self._stops.flush())
        return None

    def _finish(self, response: generation_pb2.GenerateResponse, delta: engine_pb2.RequestDelta,
                match: StopMatch | None) -> None:
        self.finished = True
        if match is not None:
            response.finish_reason = common_pb2.FINISH_REASON_STOP
            response.matched_stop = match.stop
        else:
            response.finish_reason = delta.finish_reason
            if delta.HasField("matched_stop_token_id"):
                response.matched_stop_token_id = delta.matched_stop_token_id
        response.usage.prompt_tokens = self._prompt_tokens
        response.usage.completion_tokens = self.num_completion_tokens
        if self._speculative is not None:
            response.speculative.CopyFrom(self._speculative)

    def _with_texts(self, logprob: common_pb2.TokenLogprob) -> common_pb2.TokenLogprob:
        filled = common_pb2.TokenLogprob()
        filled.CopyFrom(logprob)
        for top in filled.top:
            top.text = self._tokenizer.token_text(top.token_id)
        return filled
