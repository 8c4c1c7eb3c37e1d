"""The engine against transformers' own `generate` and against the bytes roofline, printed as JSON.

    python benchmarks/bench_engine_vs_hf.py [--layers 4] [--batches 1 16 64 256] [--ks 0 1 2 3]
        [--checkpoint DIR] [--load-format dummy] [--draft-vocab N] [--out FILE] [--smoke]

A checkpoint with Qwen3-Next-80B's per-layer shapes (every 4th layer full attention; 4 layers: 3 GDN
+ 1 attention) is written once (or reused): transformers' model built from the config on the GPU
with its own random init, saved in the HF layout, plus random `mtp.*` weights. In the same process:
the copy rate, transformers' `generate` (fla-core's kernels when installed), and our engine on that
checkpoint at each batch with 128-token prompts; k = 0 also with async scheduling; k = 1..3 both with the MTP head and with scripted
always-right drafts (the upper bound). The scripted drafts are the greedy run's own tokens, looked up in
a device table inside the decode step's CUDA graph (KnownTokensProposer), so the step does no host work
for them, as with the MTP head. Per decode step: ms, tokens/s, the ratio to transformers and,
at k = 0, to the roofline: non-expert weights + the distinct experts the step touched x expert bytes
+ KV and GDN state traffic, over the copy rate. `--smoke` runs the built-in model on the CPU, 16-token prompts (CI).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_bench import ceilings, emit, free_engine_memory, save_partial  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.engine.proposer import KnownTokensProposer  # noqa: E402
from worker.engine.sampling_params import SamplingParams  # noqa: E402
from worker.kernels.pdl import use_pdl  # noqa: E402
from worker.model.moe import Experts  # noqa: E402
from worker.tools.model_shapes import shape_config, write_shape_config  # noqa: E402
from worker.tools.tiny_weights import tensor_specs  # noqa: E402

PROMPT_LEN = 128
MAX_MODEL_LEN = 1024


def write_checkpoint(out: Path, layers: int, device: str) -> Path:
    """transformers' Qwen3-Next at the 80B shape with `layers` layers, plus random mtp.* tensors."""
    from safetensors.torch import save_file
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    if (out / "config.json").is_file():
        return out
    config_dict = shape_config("qwen3-next-80b", layers)
    with torch.device(device):
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**config_dict)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    gen = torch.Generator(device=device).manual_seed(0)
    mtp = {}
    for spec in tensor_specs(config_dict, mtp=True):
        if spec.name.startswith("mtp."):
            std = 0.02 if len(spec.shape) == 1 else spec.shape[-1] ** -0.5
            mtp[spec.name] = (torch.randn(spec.shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
    save_file(mtp, str(out / "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: "model-mtp.safetensors" for name in mtp})
    index_path.write_text(json.dumps(index, indent=1))
    del model
    return out


def prompts_for(batch: int, vocab: int, prompt_len: int = PROMPT_LEN) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist()


def hf_decode_ms(model_dir: Path, batches, new_tokens: int, device: str, prompt_len: int = PROMPT_LEN) -> dict:
    """ms per decode step of transformers' generate: (time for 1 + n tokens - time for 1) / n."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    out = {}
    for batch in batches:
        ids = torch.tensor(prompts_for(batch, model.config.vocab_size, prompt_len), device=device)

        def run(n):
            _sync(device)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            _sync(device)
            return time.perf_counter() - start

        run(2)  # warm-up
        out[batch] = (run(1 + new_tokens) - run(1)) / new_tokens * 1e3
    del model
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_for(model_dir: Path, k: int, batches: list[int], device: str, dtype: str, proposer=None,
               **overrides) -> LLMEngine:
    """Graphs for the measured batch sizes only: capture time is device time. `overrides` go into EngineConfig."""
    max_batch = max(batches)
    config = dict(model=str(model_dir), device=device, dtype=dtype, speculative_tokens=k, max_num_seqs=max_batch,
                  max_num_batched_tokens=max(2048, max_batch * PROMPT_LEN), max_model_len=MAX_MODEL_LEN,
                  gpu_memory_utilization=0.85, cuda_graph_sizes=tuple(batches))
    return LLMEngine(EngineConfig(**{**config, **overrides}), proposer)


def run_batch(engine: LLMEngine, prompts, new_tokens: int) -> dict:
    """Generate new_tokens per prompt; -> time and tokens of the decode steps (plans with no prefill)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{len(prompts)}-{i}", prompt, params)
    has_prefill = []
    launch = engine.runner.launch

    def watched(plan, *args, **kwargs):
        has_prefill.append(any(not s.is_decode for s in plan.sequences))
        return launch(plan, *args, **kwargs)

    engine.runner.launch = watched
    decode_s, decode_steps, decode_tokens, outputs, step_ms = 0.0, 0, 0, {}, []
    try:
        while engine.has_unfinished:
            has_prefill.clear()
            start = time.perf_counter()
            results = engine.step()
            elapsed = time.perf_counter() - start
            if results and not any(has_prefill):  # (with async scheduling a step may launch nothing)
                decode_s += elapsed
                decode_steps += 1
                step_ms.append(elapsed * 1e3)
                decode_tokens += sum(len(r.new_token_ids) for r in results)
            outputs.update({r.request_id: r for r in results if r.finished})
    finally:
        engine.runner.launch = launch
    return dict(decode_s=decode_s, decode_steps=decode_steps, decode_tokens=decode_tokens, outputs=outputs,
                step_ms=step_ms)


def decode_rates(measured: dict) -> tuple[float, float | None]:
    """(ms per decode step, decode tokens/s) of a run_batch result."""
    ms = measured["decode_s"] * 1e3 / max(1, measured["decode_steps"])
    return ms, measured["decode_tokens"] / measured["decode_s"] if measured["decode_s"] else None


def step_spread(step_ms: list[float]) -> dict:
    """The median step and the first and slowest, to tell a steady step from start-up and tail effects
    (ms_per_step is the mean, as tokens/s is)."""
    if not step_ms:
        return {}
    return dict(median_ms_per_step=round(statistics.median(step_ms), 3), first_step_ms=round(step_ms[0], 3),
                max_step_ms=round(max(step_ms), 3))


def step_bytes(engine: LLMEngine, prompts) -> dict:
    """Bytes a k = 0 decode step reads or writes once: measured routing (distinct experts per layer)."""
    model = engine.model
    distinct = []
    hooks = [m.register_forward_hook(lambda mod, args, out: distinct.append(args[2].unique().numel()))
             for m in model.modules() if isinstance(m, Experts)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bytes-{i}", prompt, params)
    graphs = engine.worker.decode_graphs
    captured, graphs.graphs = graphs.graphs, {}  # hooks run only eagerly
    try:
        while engine.has_unfinished:
            distinct.clear()
            engine.step()
    finally:
        graphs.graphs = captured
        for h in hooks:
            h.remove()
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    per_expert = 3 * experts[0].w13.shape[2] * experts[0].w2.shape[2] * experts[0].w13.element_size()
    expert_params = {id(m.w13) for m in experts} | {id(m.w2) for m in experts}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    dense -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    if model.mtp is not None:
        dense -= sum(p.numel() * p.element_size() for p in model.mtp.parameters() if id(p) not in expert_params)
    main_distinct = distinct[: len(model.model.layers)]
    batch = len(prompts)
    state = sum(2 * batch * layer.ssm_states[0, 0].numel() * layer.ssm_states.element_size()
                for layer in model.gdn_layers())
    kv = sum(batch * (len(prompts[0]) + 1) * 2 * layer.k_cache[0, 0].numel() * layer.k_cache.element_size()
             for layer in model.attention_layers()[: sum(1 for x in model.model.layers
                                                         if x.layer_type == "full_attention")])
    total = dense + sum(main_distinct) * per_expert + state + kv
    return dict(bytes=total, dense_bytes=dense, distinct_experts=main_distinct, state_bytes=state, kv_bytes=kv)


def _mean_accepted(outputs: dict) -> float | None:
    drafted = [out for out in outputs.values() if out.num_drafted_tokens]
    return round(sum(out.mean_accepted_length for out in drafted) / len(drafted), 3) if drafted else None


def whole_sequences(outputs: dict) -> dict[str, list[int]]:
    """request id -> its prompt and generated tokens: what always-right drafts propose."""
    return {rid: out.prompt_token_ids + out.token_ids for rid, out in outputs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="the MTP head drafts from token ids 0..N-1 only (--speculative-token-map), to time "
                             "a draft vocabulary of that size")
    parser.add_argument("--async-ks", type=int, nargs="*", default=[0, 1], help="ks also run with async scheduling")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/nextserve-80b-shape"))
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the device from the config alone (no checkpoint "
                             "written, no transformers run): a quick engine-only run")
    parser.add_argument("--smoke", action="store_true", help="the built-in model on the CPU, batch 1 and 2, k 0 and 1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    if args.smoke:
        from worker.tools.builtin_model import builtin_model_dir

        model_dir, args.batches, args.ks, args.new_tokens, args.async_ks = builtin_model_dir(), [1, 2], [0, 1], 4, [0]
        args.prompt_len = 16  # transformers' torch GDN reference spends a minute on 128-token prompts on 2 cores
        rates = None
    else:
        rates = ceilings()
        if args.load_format == "dummy":
            model_dir = write_shape_config(Path(tempfile.mkdtemp()), num_layers=args.layers)
        else:
            model_dir = write_checkpoint(args.checkpoint, args.layers, device)
    result = dict(benchmark="bench_engine_vs_hf", model=str(model_dir), layers=args.layers, ceilings=rates,
                  load_format=args.load_format, pdl=use_pdl(torch.device(device)), rows=[])
    if not args.no_hf and args.load_format != "dummy":
        result["hf_ms_per_step"] = hf_decode_ms(model_dir, args.batches, args.new_tokens, device, args.prompt_len)
    map_args = {}
    if args.draft_vocab:
        map_path = Path(tempfile.mkdtemp()) / "draft_vocab.json"
        map_path.write_text(json.dumps(list(range(args.draft_vocab))))
        map_args = dict(speculative_token_map=str(map_path))
        result["draft_vocab"] = args.draft_vocab
    truth = {}
    for k in args.ks:
        kinds = ["mtp", "scripted"] if k else ["none"]
        if k in args.async_ks:
            kinds.append("mtp-async" if k else "async")  # the same with async scheduling
        for kind in kinds:
            proposer, script_truth = None, dict(truth)
            if kind == "scripted":  # reads script_truth when a request's prefill ends
                proposer = KnownTokensProposer(script_truth, k, max(args.batches), MAX_MODEL_LEN, device)
            engine = engine_for(model_dir, k, args.batches, device, dtype, proposer,
                                async_scheduling=kind.endswith("async"), load_format=args.load_format,
                                **(map_args if k else {}))
            for batch in args.batches:
                prompts = prompts_for(batch, engine.model_config.vocab_size, args.prompt_len)
                run_batch(engine, prompts[:1], 2)  # warm-up (compiles)
                if kind == "scripted":
                    # The verify step's greedy tokens can differ from k = 0's in bf16 (other batch shapes round
                    # differently); a first pass at this k gives the continuation its verify steps produce.
                    first = run_batch(engine, prompts, args.new_tokens)
                    script_truth.update(whole_sequences(first["outputs"]))
                measured = run_batch(engine, prompts, args.new_tokens)
                if kind == "none":
                    truth.update(whole_sequences(measured["outputs"]))
                ms, tokens_per_s = decode_rates(measured)
                row = dict(k=k, drafts=kind, batch=batch, ms_per_step=round(ms, 3), decode_steps=measured["decode_steps"],
                           **step_spread(measured["step_ms"]),
                           mean_accepted_length=_mean_accepted(measured["outputs"]),
                           decode_tokens=measured["decode_tokens"],
                           decode_tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None)
                hf = result.get("hf_ms_per_step", {}).get(batch)
                if hf and tokens_per_s:
                    row["x_transformers_tokens_per_s"] = round(tokens_per_s / (batch * 1e3 / hf), 2)
                if kind == "none" and rates:
                    traffic = step_bytes(engine, prompts)
                    roofline_ms = traffic["bytes"] / rates["copy_GBps"] / 1e6
                    row.update(traffic, roofline_ms=round(roofline_ms, 4), fraction_of_roofline=round(roofline_ms / ms, 3))
                result["rows"].append(row)
                print(json.dumps(row), file=sys.stderr)
                save_partial(result, args.out)
            engine.shutdown()
            del engine
            free_engine_memory()
    emit(result, args.out)


if __name__ == "__main__":
    main()
