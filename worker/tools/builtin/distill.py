"""The MTP head alone, distilled from its own trained model: the main model is frozen, and the head learns the
main model's next-token distribution one and two positions on, which is what greedy verification accepts.

Row i of the first draft predicts t[i+2]; the main model's row i+1 predicts that token from the tokens up to
t[i+1], so its softmax is the first draft's target. The chained draft's row i (t[i+3]) takes the main model's
row i+2. Joint training cut the head at the main model's best step (it overfits the stdlib after a few epochs);
soft targets from a fixed teacher let the head train longer without learning the data's noise.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from worker.tools.builtin.metrics import evaluate, random_windows
from worker.tools.builtin.training import Progress, learning_rate, log


def distillation_losses(main: torch.Tensor, mtp: torch.Tensor, chain: torch.Tensor | None):
    """KL(main's row i+1 || mtp's row i) and KL(main's row i+2 || chain's row i), mean per row; [B, T, V] logits."""
    teacher = main.detach().float().log_softmax(-1)
    first = _kl(teacher[:, 1:], mtp[:, :-1])
    second = _kl(teacher[:, 2:], chain[:, :-2]) if chain is not None else torch.zeros((), device=main.device)
    return first, second


def _kl(teacher_log_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    student = student_logits.float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(student, teacher_log_probs.flatten(0, 1), log_target=True, reduction="batchmean")


def distill_mtp(model, args, recipe, train_stream, val, device, autocast):
    """Train model.mtp alone; -> (Progress with the best validation state, seconds trained)."""
    for p in model.lm.parameters():
        p.requires_grad_(False)
    params = list(model.mtp.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    chain = args.mtp_chain_weight > 0
    progress = Progress()
    running = torch.zeros(2, device=device)
    start = last_val = time.monotonic()
    logged_step = 0
    _train_head_only(model)
    validate_head(model, val, recipe, autocast, progress, 0.0)
    while True:
        elapsed = time.monotonic() - start
        if recipe.max_steps and progress.step >= recipe.max_steps:
            progress.stopped_by = "max_steps"
            break
        if elapsed >= args.time_budget_s:
            progress.stopped_by = "time_budget"
            break
        fraction = max(elapsed / args.time_budget_s, progress.step / recipe.max_steps if recipe.max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, progress.step, fraction)
        batch = random_windows(train_stream, recipe.seq_len, recipe.batch_size, generator)
        with autocast:
            out = model(batch, chain=chain)
            first, second = distillation_losses(out.main, out.mtp, out.chain)
        loss = first + args.mtp_chain_weight * second
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running += torch.stack([first.detach(), second.detach()])
        progress.step += 1
        progress.tokens += batch.shape[0] * recipe.seq_len
        if progress.step % args.log_every == 0 or progress.step == 1:
            means = (running / (progress.step - logged_step)).tolist()
            running.zero_()
            if not all(math.isfinite(x) for x in means):
                progress.stopped_by = f"non-finite loss by step {progress.step}: {means}"
                log(progress.stopped_by)
                break
            log(f"step {progress.step} kl {means[0]:.4f} chain kl {means[1]:.4f} "
                f"elapsed {time.monotonic() - start:.0f} s")
            logged_step = progress.step
        if time.monotonic() - last_val >= args.val_every_s:
            validate_head(model, val, recipe, autocast, progress, time.monotonic() - start)
            last_val = time.monotonic()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trained_s = time.monotonic() - start
    validate_head(model, val, recipe, autocast, progress, trained_s)
    return progress, trained_s


def _train_head_only(model) -> None:
    """The head in training mode (its dropout on), the teacher in eval mode (none on its targets)."""
    model.train()
    model.lm.eval()


def validate_head(model, val, recipe, autocast, progress: Progress, at_s: float) -> None:
    """Validation's mean accepted length at k = 2 (what the engine's drafts earn), its best state kept."""
    result = evaluate(model, val, recipe.batch_size, autocast, chain=True)
    _train_head_only(model)
    point = {"step": progress.step, "time_s": round(at_s, 1), "mtp_agreement": result["mtp_agreement"],
             "chain_agreement": result["chain_agreement"], "score": result["mean_accepted_len_k2"]}
    progress.val_curve.append(point)
    log(f"val step {progress.step}: mtp_agreement {point['mtp_agreement']:.4f} "
        f"chain_agreement {point['chain_agreement']:.4f} accepted_len_k2 {point['score']:.4f}")
    if math.isfinite(point["score"]) and point["score"] > progress.best_score:
        progress.best_score, progress.best_step = point["score"], progress.step
        progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
