"""Held-out figures of the built-in model, teacher-forced over fixed windows of a token stream.

With m the main model's argmax and d1, d2 the MTP head's first and chained drafts (row i of each
predicts t[i+1], t[i+2], t[i+3]): `mtp_agreement` is P(d1[i] == m[i+1]), the rate greedy verification
accepts a first draft at; `chain_agreement` is P(d2[i] == m[i+2]); and the mean accepted length at
k = 2 is estimated as 1 + P(d1 ok) + P(d1 ok and d2 ok). On generated text the drafts read the
model's own tokens rather than the data's, so these are estimates, not the engine's measurements.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

WINDOW_EXTRA = 3  # tokens past the T rows: the targets of the main, MTP and chained predictions


def windows(stream: torch.Tensor, num_rows: int, limit: int | None = None) -> torch.Tensor:
    """[N, T + 3] non-overlapping windows: window j's rows are stream positions j*T .. j*T + T - 1."""
    count = (stream.numel() - WINDOW_EXTRA) // num_rows
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {num_rows} + {WINDOW_EXTRA}")
    starts = torch.arange(count)[:, None] * num_rows
    return stream[starts + torch.arange(num_rows + WINDOW_EXTRA)]


def random_windows(stream: torch.Tensor, num_rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """[B, T + 3] windows at uniformly drawn offsets; the generator lives on the stream's device, so drawing
    them copies nothing from the host."""
    device = stream.device
    starts = torch.randint(0, stream.numel() - num_rows - WINDOW_EXTRA + 1, (batch_size,), generator=generator,
                           device=device)
    return stream[starts[:, None] + torch.arange(num_rows + WINDOW_EXTRA, device=device)]


@torch.no_grad()
def evaluate(model, batches: torch.Tensor, batch_size: int, autocast: contextlib.AbstractContextManager | None = None,
             chain: bool = True) -> dict:
    """Losses (nats per token) and argmax rates over `batches` [N, T + 3], in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = dict.fromkeys(("loss", "top1", "mtp_loss", "mtp_top1", "mtp_agreement", "chain_loss", "chain_top1",
                          "chain_agreement", "both_accepted"), 0.0)
    counts = dict.fromkeys(sums, 0)
    for batch in batches.split(batch_size):
        batch = batch.to(device)
        with autocast or contextlib.nullcontext():
            out = model(batch, chain=chain)
        num_rows = out.main.shape[1]
        targets = [batch[:, 1 + j : 1 + j + num_rows] for j in range(3)]
        main, draft = out.main.argmax(-1), out.mtp.argmax(-1)
        _add(sums, counts, "loss", _cross_entropy_sum(out.main, targets[0]), main.numel())
        _add(sums, counts, "top1", (main == targets[0]).sum(), main.numel())
        _add(sums, counts, "mtp_loss", _cross_entropy_sum(out.mtp, targets[1]), draft.numel())
        _add(sums, counts, "mtp_top1", (draft == targets[1]).sum(), draft.numel())
        first_ok = draft[:, :-1] == main[:, 1:]
        _add(sums, counts, "mtp_agreement", first_ok.sum(), first_ok.numel())
        if out.chain is not None:
            chained = out.chain.argmax(-1)
            _add(sums, counts, "chain_loss", _cross_entropy_sum(out.chain, targets[2]), chained.numel())
            _add(sums, counts, "chain_top1", (chained == targets[2]).sum(), chained.numel())
            second_ok = chained[:, :-2] == main[:, 2:]
            _add(sums, counts, "chain_agreement", second_ok.sum(), second_ok.numel())
            _add(sums, counts, "both_accepted", (first_ok[:, :-1] & second_ok).sum(), second_ok.numel())
    model.train(was_training)
    result = {name: sums[name] / counts[name] for name in sums if counts[name]}
    result["tokens"] = counts["loss"]
    result["mean_accepted_len_k1"] = 1 + result["mtp_agreement"]
    if "chain_agreement" in result:
        result["mean_accepted_len_k2"] = 1 + result["mtp_agreement"] + result.pop("both_accepted")
    return result


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def _add(sums: dict, counts: dict, name: str, total: torch.Tensor, count: int) -> None:
    sums[name] += float(total)
    counts[name] += count
