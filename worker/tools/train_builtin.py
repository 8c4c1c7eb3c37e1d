"""Train the built-in model: a small Qwen3-Next with an MTP head, on this interpreter's standard library.

    python -m worker.tools.train_builtin --out DIR [--time-budget-s 480] [--device cuda]
    python -m worker.tools.train_builtin --out DIR --smoke      # a few CPU steps on a tiny subset (CI)
    python -m worker.tools.train_builtin --out DIR --mtp-from TRAINED [--time-budget-s 240] [--generated-seqs N]
                                          # the MTP head alone, distilled from TRAINED's frozen main model

Writes DIR in the published HF layout (config.json, generation_config.json, tokenizer files with the
ChatML template, bf16 model.safetensors with mtp.*) plus DIR/train_report.json: the data used, the
held-out figures, the checks run and the time each phase took. Training runs transformers'
Qwen3NextForCausalLM on its torch paths (worker/tools/builtin/model.py) with the MTP loss on t+2 and
on the chained draft step's t+3; it stops at --max-steps or when --time-budget-s of training is spent.
With --mtp-from, the main model and tokenizer are TRAINED's, frozen, and only the head trains, on the main
model's own distributions (worker/tools/builtin/distill.py), on the corpus and on N of the main model's own
greedy continuations; the report keeps TRAINED's training record and compares the starting and the trained
head on the main model's continuations of held-out windows (`own_text`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from worker.tools.builtin.model import use_torch_paths

# Qwen3-Next's layer kinds at ~4.9 M parameters (9.8 MB in bf16): layers 0, 1, 3, 4 Gated DeltaNet, 2 and 5
# gated attention, all sparse MoE (8 experts, top 2, shared expert), one MTP layer. lm_head is untied.
BUILTIN_ARCHITECTURE = dict(
    vocab_size=4096, hidden_size=192, intermediate_size=384, num_hidden_layers=6, full_attention_interval=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.5, rope_theta=10000.0,
    max_position_embeddings=2048, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
    linear_value_head_dim=64, decoder_sparse_step=1, mlp_only_layers=[], num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=48, shared_expert_intermediate_size=96, norm_topk_prob=True,
)
SMOKE_ARCHITECTURE = dict(
    BUILTIN_ARCHITECTURE, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512, linear_num_key_heads=1,
    linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
    moe_intermediate_size=16, shared_expert_intermediate_size=32,
)


@dataclass(frozen=True)
class Recipe:
    architecture: dict
    seq_len: int = 512
    batch_size: int = 64
    max_steps: int = 0  # 0: until the time budget is spent
    corpus_subset: dict | None = None  # files per split; None: the whole stdlib
    max_eval_windows: int | None = None
    val_windows: int = 64  # of the val split, for the curve and the choice of the weights kept
    sample_tokens: int = 64
    generated_prompt_tokens: int = 32  # --mtp-from: the real text before each of the main model's continuations
    generated_new_tokens: int = 160


RECIPES = {
    "builtin": Recipe(BUILTIN_ARCHITECTURE),
    "smoke": Recipe(SMOKE_ARCHITECTURE, seq_len=64, batch_size=4, max_steps=3,
                    corpus_subset={"train": 24, "val": 2, "eval": 3}, max_eval_windows=8, val_windows=4,
                    sample_tokens=8, generated_prompt_tokens=8, generated_new_tokens=16),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write (absent or empty)")
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps of a tiny model on a tiny subset")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="training autocast (default: bf16 on cuda, fp32 on cpu); weights stay fp32")
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="stop training after this long")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--max-epochs", type=float, default=0.0,
                        help="stop training after this many passes over the train split's tokens (0: no limit)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to --min-lr-ratio of it)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.1, help="on each token mixer's and MLP's output")
    parser.add_argument("--mtp-weight", type=float, default=0.5, help="loss weight of the MTP head's t+2")
    parser.add_argument("--mtp-chain-weight", type=float, default=0.25,
                        help="loss weight of the chained draft step's t+3 (0: not trained, not run)")
    parser.add_argument("--router-aux-weight", type=float, default=0.01, help="MoE load-balancing loss weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    parser.add_argument("--val-every-s", type=float, default=30.0, help="seconds between validation passes")
    parser.add_argument("--mtp-from", type=Path, default=None,
                        help="a trained folder: keep its main model and tokenizer, distill its MTP head anew")
    parser.add_argument("--generated-seqs", type=int, default=0,
                        help="--mtp-from: train also on this many of the main model's greedy continuations")
    parser.add_argument("--generated-fraction", type=float, default=0.5,
                        help="the share of steps whose batch is taken from those continuations")
    parser.add_argument("--generation-batch", type=int, default=256, help="sequences generated at once")
    args = parser.parse_args(argv)
    recipe = RECIPES["smoke" if args.smoke else "builtin"]
    overrides = {k: v for k, v in (("seq_len", args.seq_len), ("batch_size", args.batch_size),
                                   ("max_steps", args.max_steps)) if v is not None}
    args.recipe = replace(recipe, **overrides)
    return args


def main(argv=None) -> int:
    started = time.monotonic()
    timings = {}
    args = parse_args(argv)
    use_torch_paths()
    import torch

    from tokenizers import Tokenizer

    from worker.tools.builtin import corpus as data
    from worker.tools.builtin.distill import distill_mtp, own_text
    from worker.tools.builtin.export import load_folder, reload_loss, round_to_bf16_, round_trip_difference, save_folder
    from worker.tools.builtin.metrics import evaluate, windows
    from worker.tools.builtin.model import BuiltinModel, check_causal, check_dense_experts
    from worker.tools.builtin.training import log, train
    from worker.tools.tiny_checkpoint import published_config
    from worker.tools.tiny_tokenizer import ENDOFTEXT, IM_END

    out_dir, recipe = args.out, args.recipe
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed)

    def phase(name):
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 2)
        log(f"{name} done at {time.monotonic() - started:.1f} s")

    corpus = data.load_stdlib()
    if recipe.corpus_subset:
        corpus = data.smoke_subset(corpus, recipe.corpus_subset)
    phase("read_corpus")
    if args.mtp_from is None:
        tokenizer = data.build_tokenizer(corpus, recipe.architecture["vocab_size"])
    else:
        tokenizer = Tokenizer.from_file(str(args.mtp_from / "tokenizer.json"))
    streams = {name: data.token_stream(tokenizer, corpus.split(name)) for name in data.SPLITS}
    phase("tokenizer")
    if args.mtp_from is None:
        token_ids = {t: tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_END)}
        config_json = published_config(recipe.architecture, "bfloat16", token_ids)
        model = BuiltinModel(config_json, dropout=args.dropout).to(device)
    else:
        model = load_folder(args.mtp_from, dropout=args.dropout).to(device)
        config_json = model.config_json
    checks = {"dense_experts_max_diff": check_dense_experts(model), "causal_at_init": check_causal(model)}
    phase("build_and_check")
    log(f"Python {platform.python_version()}: {len(corpus.files)} stdlib files, tokens "
        f"{ {name: s.numel() for name, s in streams.items()} }; model {sum(p.numel() for p in model.parameters()):,} "
        f"parameters ({sum(p.numel() for p in model.mtp.parameters()):,} in the MTP head); {_device_name(device)}, "
        f"{precision}, batch {recipe.batch_size} x {recipe.seq_len} tokens")

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    val = windows(streams["val"], recipe.seq_len, recipe.val_windows)
    eval_windows = windows(streams["eval"], recipe.seq_len, recipe.max_eval_windows)
    own, start_figures = None, None
    if args.mtp_from is None:
        progress, trained_s = train(model, args, recipe, streams["train"].to(device), val, device, autocast)
    else:
        own = own_text(model, streams["train"], val, eval_windows[: 2 * recipe.val_windows], recipe, args, device)
        log(f"the main model's own text: {own.summary()}")
        start_figures = evaluate(model, own.heldout, recipe.batch_size, autocast)
        phase("generate")
        progress, trained_s = distill_mtp(model, args, recipe, streams["train"].to(device), val, device, autocast,
                                          own)
    phase("train")

    kept = "final"
    if progress.best_state is not None and progress.best_step != progress.step:
        model.load_state_dict(progress.best_state)
        score = "(top1 + mtp_agreement) / 2" if args.mtp_from is None else "mean accepted length at k = 2"
        kept = f"best validation {score}, step {progress.best_step}"
    progress.best_state = None
    round_to_bf16_(model)
    files = save_folder(out_dir, model, tokenizer, config_json)
    phase("save")

    # Past this point the folder exists: a failing step is recorded in the report instead of losing the run.
    errors = {}
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    train_windows = windows(streams["train"], recipe.seq_len, len(eval_windows))
    results = {name: attempt(errors, name, evaluate, model, batches, recipe.batch_size)
               for name, batches in (("heldout", eval_windows), ("val", val), ("train_sample", train_windows))}
    if own is not None:
        results["heldout_own_text"] = attempt(errors, "heldout_own_text", evaluate, model, own.heldout,
                                              recipe.batch_size)
    checks["causal_trained"] = attempt(errors, "causal_trained", check_causal, model)
    phase("evaluate")
    reloaded = attempt(errors, "transformers_reload", reload_loss, out_dir, eval_windows, recipe.batch_size, device)
    if reloaded is not None and results["heldout"] is not None:
        difference = abs(reloaded - results["heldout"]["loss"])
        checks["transformers_reload"] = {"heldout_loss": reloaded, "difference": difference}
        if difference > 2e-3:
            errors["transformers_reload"] = (f"transformers reloads the folder with held-out loss {reloaded:.5f}, "
                                             f"the trained model has {results['heldout']['loss']:.5f}")
    round_trip = attempt(errors, "round_trip", round_trip_difference, model, out_dir, eval_windows[:4])
    if round_trip is not None:
        checks["round_trip_max_logit_difference"] = round_trip
        if round_trip > 1e-4:
            errors["round_trip"] = f"the folder read back gives logits {round_trip:.3g} away from the trained model's"
    sample = attempt(errors, "sample", greedy_sample, model, tokenizer, "def fibonacci(n):\n", recipe.sample_tokens,
                     device)
    phase("reload_and_sample")

    report = build_report(args, recipe, corpus, streams, tokenizer, model, device, precision, progress, trained_s,
                          kept, results, checks, files, sample, timings, time.monotonic() - started)
    if args.mtp_from is not None:
        report["training"]["stage"] = "mtp_distillation: the main model frozen, the head on its distributions"
        report["base"] = base_record(args.mtp_from)
        report["own_text"] = {**own.summary(), "heldout_start": start_figures,
                              "heldout_trained": results["heldout_own_text"]}
    report["errors"] = errors
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(json.dumps({k: report[k] for k in ("heldout", "targets", "training", "errors")}, indent=2))
    for name, error in errors.items():
        log(f"FAILED {name}: {error}")
    return 1 if errors else 0


def attempt(errors: dict, name: str, fn, *args):
    """fn(*args), or None with the error kept under errors[name] (and its traceback printed)."""
    try:
        return fn(*args)
    except Exception as e:  # the report must still be written
        traceback.print_exc()
        errors[name] = f"{type(e).__name__}: {e}"
        return None


def greedy_sample(model, tokenizer, prompt: str, num_tokens: int, device) -> dict:
    """A greedy continuation by the main model, recomputed from scratch per token (no cache to go wrong)."""
    import torch

    ids = tokenizer.encode(prompt).ids
    num_prompt = len(ids)
    model.eval()
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model.lm(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return {"prompt": prompt, "completion": tokenizer.decode(ids[num_prompt:])}


def build_report(args, recipe, corpus, streams, tokenizer, model, device, precision, progress, trained_s, kept,
                 results, checks, files, sample, timings, total_s) -> dict:
    import tokenizers
    import torch
    import transformers

    heldout = results["heldout"] or {"top1": math.nan, "mtp_agreement": math.nan}
    num_main = sum(p.numel() for p in model.lm.parameters())
    num_mtp = sum(p.numel() for p in model.mtp.parameters())
    data_summary = corpus.summary()
    data_summary["tokens"] = {name: int(s.numel()) for name, s in streams.items()}
    return {
        "targets": {"heldout_top1 >= 0.50": heldout["top1"] >= 0.5,
                    "heldout_mtp_agreement >= 0.60": heldout["mtp_agreement"] >= 0.6},
        "heldout": heldout,
        "val": results["val"],
        "train_sample": results["train_sample"],
        "training": {
            "steps": progress.step, "tokens_seen": progress.tokens,
            "epochs": progress.tokens / max(1, data_summary["tokens"]["train"]),
            "train_time_s": round(trained_s, 1), "total_time_s": round(total_s, 1), "stopped_by": progress.stopped_by,
            "weights_kept": kept, "device": _device_name(device), "precision": precision,
            "seq_len": recipe.seq_len, "batch_size": recipe.batch_size,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "recipe"},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__, "cuda": torch.version.cuda},
            "gdn_path": "transformers' torch chunked gated delta rule (fla and causal_conv1d blocked)",
        },
        "val_curve": progress.val_curve,
        "model": {"parameters": num_main + num_mtp, "parameters_main": num_main, "parameters_mtp": num_mtp,
                  "tokenizer_vocab": tokenizer.get_vocab_size(), "architecture": recipe.architecture, "files": files},
        "data": data_summary,
        "checks": checks,
        "sample": sample,
        "timings_s": timings,
        "recipe": asdict(recipe),
    }


def base_record(trained: Path) -> dict:
    """Where the frozen main model came from: its folder's own training record, as far as it has one."""
    path = trained / "train_report.json"
    source = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    record = {"from": str(trained)}
    for key in ("base", "training", "val_curve", "heldout"):
        if key in source:
            record[key] = source[key]
    return record


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    raise SystemExit(main())
