"""The MTP head alone, distilled from its own trained model: the main model is frozen, and the head learns the
main model's next-token distribution one and two positions on, which is what greedy verification accepts.

Row i of the first draft predicts t[i+2]; the main model's row i+1 predicts that token from the tokens up to
t[i+1], so its softmax is the first draft's target. The chained draft's row i (t[i+3]) takes the main model's
row i+2. Joint training cut the head at the main model's best step (it overfits the stdlib after a few epochs);
soft targets from a fixed teacher let the head train longer without learning the data's noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.tools.builtin.metrics import evaluate
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


def distill_mtp(model, args, recipe, train_stream, val, device, autocast):
    """Train model.mtp alone; -> (Progress with the best validation state, seconds trained)."""
    for p in model.lm.parameters():
        p.requires_grad_(False)

    def loss(batch):
        with autocast:
            out = model(batch, chain=args.mtp_chain_weight > 0)
            first, second = distillation_losses(out.main, out.mtp, out.chain)
        return first + args.mtp_chain_weight * second, torch.stack([first.detach(), second.detach()])

    _train_head_only(model)
    objective = Objective(list(model.mtp.parameters()), loss, lambda m: f"kl {m[0]:.4f} chain kl {m[1]:.4f}",
                          lambda progress, at_s: validate_head(model, val, recipe, autocast, progress, at_s),
                          num_parts=2, validate_first=True)
    return fit(objective, args, recipe, train_stream, device)


def _train_head_only(model) -> None:
    """The head in training mode (its dropout on), the teacher in eval mode (none on its targets)."""
    model.train()
    model.lm.eval()


def validate_head(model, val, recipe, autocast, progress: Progress, at_s: float) -> None:
    """Validation's mean accepted length at k = 2 (what the engine's drafts earn), its best state kept."""
    result = evaluate(model, val, recipe.batch_size, autocast, chain=True)
    _train_head_only(model)
    point = {"step": progress.step, "time_s": round(at_s, 1), "mtp_agreement": result["mtp_agreement"],
             "chain_agreement": result["chain_agreement"], "accepted_len_k2": result["mean_accepted_len_k2"],
             "score": result["mean_accepted_len_k2"]}
    record_validation(model, progress, point, ("mtp_agreement", "chain_agreement", "accepted_len_k2"))
