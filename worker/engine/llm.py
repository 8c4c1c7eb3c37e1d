"""The offline API: `LLM(model=DIR, ...).generate(prompts, SamplingParams(...))`."""

import itertools
from pathlib import Path

from tqdm import tqdm

from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine, RequestOutput
from worker.engine.proposer import Proposer
from worker.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


class LLM:
    """An engine in this process (and, with tensor_parallel_size > 1, its ranks in child processes).

        with LLM(model_dir, tensor_parallel_size=2) as llm:
            outputs = llm.generate(prompts, SamplingParams(max_tokens=32))

    `shutdown()` stops the ranks and releases the model; it is idempotent, and also runs when the LLM
    is garbage-collected or the interpreter exits. A new LLM can be built after it.
    """

    def __init__(self, model: str | Path | None = None, proposer: Proposer | None = None, **engine_args):
        if model is None:
            from worker.tools.builtin_model import builtin_model_dir

            model = builtin_model_dir()
        self.model_dir = Path(model)
        self.engine: LLMEngine | None = LLMEngine(EngineConfig(model=str(model), **engine_args), proposer)
        self._tokenizer = None
        self._ids = itertools.count()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        if self.engine is None:
            raise RuntimeError("this LLM was shut down; build a new one")
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, per_prompt):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, p)
            order.append(request_id)
        results: dict[str, RequestOutput] = {}
        show = len(prompts) >= 8 if use_tqdm is None else use_tqdm
        with tqdm(total=len(prompts), desc="generating", unit="req", disable=not show) as bar:
            while self.engine.has_unfinished:
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update()
        return [results[r] for r in order]
