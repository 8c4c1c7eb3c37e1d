"""The training loop of the built-in model: AdamW, warm-up then cosine over the time (or step) budget, the
joint loss main + w_mtp * MTP(t+2) + w_chain * chained step(t+3) + w_aux * load balancing, progress lines
and a validation pass every so often that remembers the best weights."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from worker.tools.builtin.metrics import WINDOW_EXTRA, evaluate, random_windows
from worker.tools.builtin.model import router_aux_loss


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    stopped_by: str = ""
    val_curve: list = field(default_factory=list)
    best_score: float = -math.inf  # validation (top1 + mtp_agreement) / 2: what the targets measure
    best_step: int = 0
    best_state: dict | None = None


@dataclass
class Objective:
    """What `fit` optimises: its parameters, a batch's loss with the parts a progress line shows, the words for
    those parts, and a validation pass (progress, seconds trained) run every --val-every-s and at the end."""
    params: list
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # batch -> (loss, parts [P], detached)
    describe: Callable[[list[float]], str]
    validate: Callable[[Progress, float], None]
    num_parts: int
    max_tokens: float = 0.0  # 0: no limit
    validate_first: bool = False  # the starting weights are a candidate too (training on from trained weights)


def train(model, args, recipe, train_stream, val, device, autocast):
    """The joint training of the main model and its head; -> (Progress, seconds trained)."""
    chain = args.mtp_chain_weight > 0
    top_k = model.config.num_experts_per_tok
    T = recipe.seq_len

    def loss(batch):
        with autocast:
            out = model(batch, chain=chain)
            parts = [F.cross_entropy(out.main.flatten(0, 1).float(), batch[:, 1 : T + 1].flatten()),
                     F.cross_entropy(out.mtp.flatten(0, 1).float(), batch[:, 2 : T + 2].flatten()),
                     (F.cross_entropy(out.chain.flatten(0, 1).float(), batch[:, 3 : T + 3].flatten())
                      if chain else torch.zeros((), device=device)),
                     router_aux_loss(model.router_logits, top_k)]
        total = (parts[0] + args.mtp_weight * parts[1] + args.mtp_chain_weight * parts[2]
                 + args.router_aux_weight * parts[3])
        return total, torch.stack([x.detach().float() for x in parts])

    def describe(means):
        return f"loss {means[0]:.4f} mtp {means[1]:.4f} chain {means[2]:.4f} aux {means[3]:.3f}"

    objective = Objective(list(model.parameters()), loss, describe,
                          lambda progress, at_s: validate(model, val, recipe, autocast, progress, at_s),
                          num_parts=4, max_tokens=args.max_epochs * train_stream.numel())
    model.train()
    return fit(objective, args, recipe, lambda g: random_windows(train_stream, T, recipe.batch_size, g), device)


def fit(objective: Objective, args, recipe, draw_batch: Callable[[torch.Generator], torch.Tensor], device):
    """AdamW over the objective's parameters until a budget is spent; the model's modes are the caller's.
    draw_batch(generator) -> [B, T + 3] tokens on the device."""
    decay = [p for p in objective.params if p.dim() >= 2]
    no_decay = [p for p in objective.params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    progress = Progress()
    running = torch.zeros(objective.num_parts, device=device)
    start = last_log = last_val = time.monotonic()
    logged_tokens = logged_step = 0
    if objective.validate_first:
        objective.validate(progress, 0.0)
    while True:
        elapsed = time.monotonic() - start
        stop = _budget_spent(args, recipe, progress, elapsed, objective.max_tokens)
        if stop:
            progress.stopped_by = stop
            break
        # How far through the budget: time, steps or epochs, whichever ends first.
        fraction = max(elapsed / args.time_budget_s, progress.step / recipe.max_steps if recipe.max_steps else 0.0,
                       progress.tokens / objective.max_tokens if objective.max_tokens else 0.0)
        lr = learning_rate(args, progress.step, fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = draw_batch(generator)
        loss, parts = objective.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.params, 1.0)
        optimizer.step()
        running += parts
        progress.step += 1
        progress.tokens += batch.shape[0] * (batch.shape[1] - WINDOW_EXTRA)
        if progress.step % args.log_every == 0 or progress.step == 1:
            means = (running / (progress.step - logged_step)).tolist()
            running.zero_()
            now = time.monotonic()
            if not all(math.isfinite(x) for x in means):
                # Stop here: main() keeps the best weights validation saw.
                progress.stopped_by = f"non-finite loss by step {progress.step}: {means}"
                log(progress.stopped_by)
                break
            log(f"step {progress.step} {objective.describe(means)} lr {lr:.2e} "
                f"tok/s {(progress.tokens - logged_tokens) / (now - last_log):,.0f} elapsed {now - start:.0f} s")
            last_log, logged_tokens, logged_step = now, progress.tokens, progress.step
        if time.monotonic() - last_val >= args.val_every_s:
            objective.validate(progress, time.monotonic() - start)
            last_val = time.monotonic()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trained_s = time.monotonic() - start
    objective.validate(progress, trained_s)
    return progress, trained_s


def _budget_spent(args, recipe, progress: Progress, elapsed: float, max_tokens: float) -> str:
    if recipe.max_steps and progress.step >= recipe.max_steps:
        return "max_steps"
    if max_tokens and progress.tokens >= max_tokens:
        return "max_epochs"
    if elapsed >= args.time_budget_s:
        return "time_budget"
    return ""


def learning_rate(args, step: int, fraction: float) -> float:
    """Linear warm-up, then cosine from the peak to min_lr_ratio of it over the budget."""
    warm = min(1.0, (step + 1) / args.warmup_steps)
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))
    return args.lr * warm * cosine


def validate(model, val, recipe, autocast, progress: Progress, at_s: float) -> None:
    result = evaluate(model, val, recipe.batch_size, autocast, chain=False)
    point = {"step": progress.step, "time_s": round(at_s, 1), "loss": result["loss"], "top1": result["top1"],
             "mtp_agreement": result["mtp_agreement"], "score": (result["top1"] + result["mtp_agreement"]) / 2}
    # Argmax rates rather than the loss: an over-trained model turns over-confident (its loss rises) while its
    # argmax, which greedy decoding and draft acceptance use, still improves.
    record_validation(model, progress, point, ("loss", "top1", "mtp_agreement"), math.isfinite(result["loss"]))


def record_validation(model, progress: Progress, point: dict, shown: tuple[str, ...], usable: bool = True) -> None:
    """Log a validation point and add it to the curve; keep the weights when its score is the best yet."""
    progress.val_curve.append(point)
    log(f"val step {progress.step}: " + " ".join(f"{name} {point[name]:.4f}" for name in shown))
    if usable and math.isfinite(point["score"]) and point["score"] > progress.best_score:
        progress.best_score, progress.best_step = point["score"], progress.step
        progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def log(message: str) -> None:
    print(message, flush=True)
