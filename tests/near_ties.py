"""Parity without luck: find where the reference's own discrete choices are near-ties.

Two choices in a forward pass jump: MoE routing (the top-k of the router probabilities) and
greedy decoding (the argmax of the logits). Where transformers' k-th and (k+1)-th router
probabilities, or its top two logits, are closer than fp32 rounding can move them, the outcome of
a comparison with our model is decided by the CPU's instruction set and the order of additions,
not by correctness. One such tie (probabilities 0.16116546 and 0.16116543) once failed the parity
suite on one machine and passed it on another.

Tests use these helpers in one of two ways: where the data is fixed, they assert that it holds no
near-tie (the data was chosen so; a change that brings one in fails with the place named); where a
tie cannot be ruled out (long greedy runs), they compare only what comes before the first one and
say how much they left out.

A position's routing depends on every earlier position (attention and the recurrent state mix
them), so a tie at position p makes p and everything after it unreliable, never the positions before.
"""

from dataclasses import dataclass

import torch

ROUTER_MARGIN = 1e-4
"""Smallest relative gap (p_k - p_{k+1}) / p_k between the k-th and (k+1)-th router probability
that counts as decided. As p_k / p_{k+1} = exp(l_k - l_{k+1}), it is a gap of 1e-4 between the two
router logits. Measured on the presets (60 prompts of 64 tokens, 11,520 routing decisions): that
gap differs between our model and transformers by at most 1.4e-5, and transformers' own router
logits by up to 1.1e-5 between the AVX-512 and the default CPU path (the hidden states entering a
router already differ by ~1e-5 after the GDN and attention layers in fp32). 1e-4 is 7x the worst
case, while gaps this small stay rare: 3 of those 11,520 decisions."""

GREEDY_MARGIN = 2e-4
"""Smallest gap between the reference's top two logits that counts as a decided greedy token.
The parity tests allow 1e-4 between our logits and transformers' (logit std ~3, typical top-1/top-2
gap ~0.8), so two logits 1e-3 apart cannot swap; gaps this small come about once per 1,000 tokens."""


@dataclass(frozen=True)
class NearTie:
    position: int  # row of the sequence (0 = its first token)
    where: str  # the router's module name, or "greedy"
    values: tuple[float, float]  # the two probabilities or logits that nearly tie
    gap: float

    def __str__(self) -> str:
        a, b = self.values
        return f"position {self.position} at {self.where}: {a:.8g} vs {b:.8g} (gap {self.gap:.2g})"


def _is_router(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k")


def has_router(model: torch.nn.Module) -> bool:
    return any(_is_router(m) for m in model.modules())


class RoutingWatch:
    """Records the router logits of every MoE router in a transformers model (or module) while open.

    Feed it one sequence at a time, from scratch or through a cache: row i of each router's record
    is then position i of that sequence. `reset()` before the next sequence.

        with RoutingWatch(hf) as watch:
            logits = hf(torch.tensor([tokens])).logits[0]
        assert not watch.near_ties(), watch.near_ties()[0]
    """

    def __init__(self, *models: torch.nn.Module):
        self._routers = {name: m for model in models for name, m in model.named_modules() if _is_router(m)}
        if not self._routers:
            raise ValueError("no MoE router found (a dense model needs no routing watch)")
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._hooks = []

    def __enter__(self) -> "RoutingWatch":
        self.reset()
        self._hooks = [m.register_forward_hook(self._recorder(name)) for name, m in self._routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reset(self) -> None:
        self._rows = {name: [] for name in self._routers}

    def _recorder(self, name: str):
        def record(module, args, output):
            self._rows[name].append(output[0].detach().float().reshape(-1, output[0].shape[-1]))

        return record

    def near_ties(self, margin: float = ROUTER_MARGIN) -> list[NearTie]:
        """Every routing near-tie recorded since the last reset, by position."""
        ties = []
        for name, rows in self._rows.items():
            if not rows:
                continue
            probs = torch.cat(rows).softmax(dim=-1).sort(dim=-1, descending=True).values
            k = self._routers[name].top_k
            kth, next_ = probs[:, k - 1], probs[:, k]
            gaps = (kth - next_) / kth
            for p in (gaps < margin).nonzero().flatten().tolist():
                ties.append(NearTie(p, name, (kth[p].item(), next_[p].item()), gaps[p].item()))
        return sorted(ties, key=lambda t: t.position)

    def first_near_tie(self, margin: float = ROUTER_MARGIN) -> NearTie | None:
        ties = self.near_ties(margin)
        return ties[0] if ties else None


def greedy_near_ties(logits: torch.Tensor, margin: float = GREEDY_MARGIN, depth: int = 1) -> list[NearTie]:
    """Rows of logits [T, V] whose top `depth` + 1 values hold two neighbours closer than `margin`
    (depth 1: the argmax is a near-tie; depth 3: so is the order of the top 3)."""
    top = logits.float().topk(depth + 1, dim=-1).values
    gaps = top[:, :-1] - top[:, 1:]
    ties = []
    for p, j in (gaps < margin).nonzero().tolist():
        ties.append(NearTie(p, "greedy" if j == 0 else f"top-{j + 1} order", (top[p, j].item(), top[p, j + 1].item()),
                            gaps[p, j].item()))
    return ties


def assert_no_near_tie(ties: list[NearTie], what: str) -> None:
    """Fixed test data must be tie-free; name the first tie so whoever changed the data can pick other data."""
    assert not ties, (f"{what}: the reference has {len(ties)} near-tie(s), first {ties[0]}; the comparison would "
                      f"be decided by fp32 rounding, so change the test data (e.g. the prompt's seed)")
