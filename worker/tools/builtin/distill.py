"""The MTP head alone, distilled from its own trained model: the main model is frozen, and the head learns the
main model's next-token distribution one and two positions on, which is what greedy verification accepts.

Row i of the first draft predicts t[i+2]; the main model's row i+1 predicts that token from the tokens up to
t[i+1], so its softmax is the first draft's target. The chained draft's row i (t[i+3]) takes the main model's
row i+2. Joint training cut the head at the main model's best step (it overfits the stdlib after a few epochs);
soft targets from a fixed teacher let the head train longer without learning the data's noise. The batches can
mix in the main model's own greedy continuations (generated.py): the text the head drafts on in the engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.tools.builtin.generated import greedy_continuations
from worker.tools.builtin.metrics import WINDOW_EXTRA, evaluate, random_windows
from worker.tools.builtin.training import Objective, Progress, fit, record_validation


def distillation_losses(main: torch.Tensor, mtp: torch.Tensor, chain: torch.Tensor | None):
    """KL(main's row i+1 || mtp's row i) and KL(main's row i+2 || chain's row i), mean per row; [B, T, V] logits."""
    teacher = main.detach().float().log_softmax(-1)
    first = _kl(teacher[:, 1:], mtp[:, :-1])
    second = _kl(teacher[:, 2:], chain[:, :-2]) if chain is not None else torch.zeros((), device=main.device)
    return first, second


def _kl(teacher_log_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    student = student_logits.float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(student, teacher_log_probs.flatten(0, 1), log_target=True, reduction="batchmean")


def distill_mtp(model, args, recipe, train_stream, val, device, autocast, own: OwnText | None = None):
    """Train model.mtp alone; -> (Progress with the best validation state, seconds trained). With `own` (the main
    model's own text), --generated-fraction of the steps train on its continuations of training windows, and the
    weights kept are those with the best accepted length on its continuations of validation windows."""
    for p in model.lm.parameters():
        p.requires_grad_(False)

    def loss(batch):
        with autocast:
            out = model(batch, chain=args.mtp_chain_weight > 0)
            first, second = distillation_losses(out.main, out.mtp, out.chain)
        return first + args.mtp_chain_weight * second, torch.stack([first.detach(), second.detach()])

    _train_head_only(model)
    val_sets = {"": val} if own is None else {"": val, "own_": own.val.to(device)}
    objective = Objective(list(model.mtp.parameters()), loss, lambda m: f"kl {m[0]:.4f} chain kl {m[1]:.4f}",
                          lambda progress, at_s: validate_head(model, val_sets, recipe, autocast, progress, at_s),
                          num_parts=2, validate_first=True)
    return fit(objective, args, recipe, _batches(train_stream, own, args, recipe, device), device)


def _batches(train_stream, own: OwnText | None, args, recipe, device):
    """draw_batch for fit: windows of the corpus, and in --generated-fraction of the steps the model's own
    continuations (shorter rows, so more of them: about as many tokens a step)."""
    B, T = recipe.batch_size, recipe.seq_len
    generated = None if own is None or own.train is None else own.train.to(device)
    fraction = 0.0 if generated is None else args.generated_fraction
    num_generated = 0 if generated is None else max(1, B * (T + WINDOW_EXTRA) // generated.shape[1])
    step = 0

    def draw(generator: torch.Generator) -> torch.Tensor:
        nonlocal step
        step += 1
        if math.floor(step * fraction) == math.floor((step - 1) * fraction):
            return random_windows(train_stream, T, B, generator)
        return generated[torch.randint(0, generated.shape[0], (num_generated,), generator=generator, device=device)]

    return draw


@dataclass
class OwnText:
    """The frozen main model's greedy continuations [N, prompt + new tokens] of windows of each split."""
    train: torch.Tensor | None  # None: the head trains on the corpus alone
    val: torch.Tensor
    heldout: torch.Tensor
    seconds: float
    prompt_tokens: int  # of real text before each continuation

    def summary(self) -> dict:
        return {"sequences": {name: 0 if t is None else t.shape[0] for name, t in
                              (("train", self.train), ("val", self.val), ("heldout", self.heldout))},
                "prompt_tokens": self.prompt_tokens, "seconds": round(self.seconds, 1)}


def own_text(model, train_stream, val, heldout, recipe, args, device) -> OwnText:
    """recipe.generated_new_tokens greedy tokens after the first recipe.generated_prompt_tokens of each val and
    held-out window, and of --generated-seqs windows of the train stream drawn with --seed (about as long as the
    engine's benchmark runs: far into a continuation the model repeats itself, and drafts are easy)."""
    started = time.monotonic()
    prompt, new = recipe.generated_prompt_tokens, recipe.generated_new_tokens

    def continue_(windows: torch.Tensor) -> torch.Tensor:
        return greedy_continuations(model.lm, windows[:, :prompt], new, args.generation_batch).cpu()

    train = None
    if args.generated_seqs:
        # Drawn on the CPU, so the prompts are the same whatever device generates.
        generator = torch.Generator().manual_seed(args.seed)
        prompts = random_windows(train_stream.cpu(), prompt - WINDOW_EXTRA, args.generated_seqs, generator)
        train = continue_(prompts)
    val_text, heldout_text = continue_(val), continue_(heldout)  # .cpu() waits for the device
    return OwnText(train, val_text, heldout_text, time.monotonic() - started, prompt)


def _train_head_only(model) -> None:
    """The head in training mode (its dropout on), the teacher in eval mode (none on its targets)."""
    model.train()
    model.lm.eval()


def validate_head(model, val_sets: dict, recipe, autocast, progress: Progress, at_s: float) -> None:
    """Validation's mean accepted length at k = 2 (what the engine's drafts earn) on each set (keys prefix the
    figures); the last set's is the score whose best state is kept."""
    point = {"step": progress.step, "time_s": round(at_s, 1)}
    for prefix, windows in val_sets.items():
        result = evaluate(model, windows, recipe.batch_size, autocast, chain=True)
        point.update({prefix + "mtp_agreement": result["mtp_agreement"],
                      prefix + "chain_agreement": result["chain_agreement"],
                      prefix + "accepted_len_k2": result["mean_accepted_len_k2"]})
        point["score"] = result["mean_accepted_len_k2"]
    _train_head_only(model)
    record_validation(model, progress, point, tuple(k for k in point if "accepted_len" in k or "agreement" in k))
