"""nextserve worker: the engine (scheduler, caches, runner, proposer) and the Qwen3-Next model."""


def __getattr__(name):
    # The offline API pulls in torch and the model; import it only when asked for.
    if name in ("LLM", "SamplingParams", "RequestOutput"):
        from worker.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
