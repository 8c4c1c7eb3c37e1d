"""Tensor-only pieces of sampling and draft verification: no host data, no host branching on data.

`worker.engine.sampler` builds the per-row parameter tensors from the requests and calls these; the
decode graphs (`worker.engine.decode_graphs`) call `verify_batch` inside a CUDA graph, with the
parameters and uniforms in static buffers.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from worker import kernels

PAD_TOKEN_ID = -1
PAD_LOGPROB = 0.0


@dataclass
class RowSamplingParams:
    """Per-row sampling parameters as tensors [R]."""

    is_greedy: Tensor  # bool
    temperature: Tensor  # fp32, already clamped away from 0
    top_k: Tensor  # int64, the vocabulary size when off
    top_p: Tensor  # fp32, 1 when off
    min_p: Tensor  # fp32, 0 when off

    def repeat_rows(self, times: int) -> "RowSamplingParams":
        """Each row `times` times in a row (a sequence's Q verify rows)."""
        return RowSamplingParams(*(t.repeat_interleave(times) for t in (
            self.is_greedy, self.temperature, self.top_k, self.top_p, self.min_p)))


def mask_top_k_top_p(scaled: Tensor, top_k: Tensor, top_p: Tensor, use_top_p: bool) -> Tensor:
    """Set to -inf all but each row's top_k largest logits, then all but the smallest prefix (by
    descending probability) whose mass reaches top_p. One sort for both. [R, V] -> [R, V]."""
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)
    position = torch.arange(scaled.shape[1], device=scaled.device)
    removed = position[None, :] >= top_k[:, None]
    if use_top_p:
        sorted_probs = torch.softmax(sorted_logits.masked_fill(removed, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # top_p == 1 means off; a threshold above 1 keeps float rounding from cutting the tail.
        threshold = torch.where(top_p < 1, top_p, 2.0)[:, None]
        removed |= mass_before >= threshold
    sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, sorted_ids, sorted_logits)


def filtered_probs(logits: Tensor, params: RowSamplingParams, use_top_k: bool, use_top_p: bool,
                   use_min_p: bool) -> Tensor:
    """Processed logits [R, V] -> probabilities [R, V] after temperature, top-k, top-p and min-p
    (renormalised). The flags skip filters no row uses; a filter that is off for a row leaves it as is."""
    scaled = logits / params.temperature[:, None]
    if use_top_k or use_top_p:
        scaled = mask_top_k_top_p(scaled, params.top_k, params.top_p, use_top_p)
    probs = torch.softmax(scaled, dim=-1)
    if use_min_p:
        threshold = params.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """probs [R, V] (need not be normalised), uniforms [R] -> token ids [R] int64."""
    cdf = probs.cumsum(dim=-1)
    targets = uniforms * cdf[:, -1]
    ids = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1)
    # right=True never lands on a zero-probability token, except past the end through rounding.
    position = torch.arange(probs.shape[1], device=probs.device)
    last_positive = torch.where(probs > 0, position, 0).amax(dim=-1)
    return torch.minimum(ids, last_positive)


def sample_correction(probs: Tensor, draft_ids: Tensor, num_accepted: Tensor, uniforms: Tensor) -> Tensor:
    """Token after the accepted drafts: from p_k without the rejected d_{k+1} if k < Q-1, else the
    bonus from p_{Q-1}. probs [M, Q, V], draft_ids [M, Q-1], num_accepted [M], uniforms [M] -> [M]."""
    num_seqs, num_query, _ = probs.shape
    final_probs = probs[torch.arange(num_seqs, device=probs.device), num_accepted]  # [M, V]
    if num_query > 1:
        rejected = num_accepted < num_query - 1
        rejected_ids = draft_ids.gather(1, num_accepted.clamp(max=num_query - 2)[:, None])
        residual = final_probs.scatter(1, rejected_ids, 0.0)
        # A rejection of a token with p ~ 1 can leave nothing through rounding: keep p then.
        usable = rejected & (residual.sum(dim=-1) > 0)
        final_probs = torch.where(usable[:, None], residual, final_probs)
    return inverse_cdf(final_probs, uniforms)


def emitted_tokens(draft_ids: Tensor, num_accepted: Tensor, final_ids: Tensor) -> Tensor:
    """-> [N, Q]: accepted drafts, then final_ids, then PAD_TOKEN_ID."""
    num_seqs, num_drafts = draft_ids.shape
    position = torch.arange(num_drafts + 1, device=draft_ids.device)[None, :]
    pad = torch.full((num_seqs, 1), PAD_TOKEN_ID, dtype=torch.int64, device=draft_ids.device)
    drafts_then_pad = torch.cat([draft_ids, pad], dim=1)
    accepted_len = num_accepted[:, None]
    token_ids = torch.where(position < accepted_len, drafts_then_pad, PAD_TOKEN_ID)
    return torch.where(position == accepted_len, final_ids[:, None], token_ids)


def count_accepted(accepted: Tensor) -> Tensor:
    """accepted [N, Q-1] bool -> drafts accepted before the first rejection [N] int64."""
    return accepted.cumprod(dim=1).sum(dim=1)  # a bool cumprod is int64 already


def verify_batch(logits: Tensor, draft_ids: Tensor, params: RowSamplingParams | None,
                 uniforms: Tensor | None) -> tuple[Tensor, Tensor]:
    """Verify point-mass drafts for a batch whose rows need no penalties, min_tokens or logprobs.

    logits [N, Q, V]; draft_ids [N, Q-1]; params per sequence [N] and uniforms [N, Q], or both None
    when every row is greedy. -> (token_ids [N, Q] as `emitted_tokens`, num_accepted [N]). With
    Q == 1 this samples one token per row. The rule is `sampler.verify_drafts`'.
    """
    num_seqs, num_query, vocab_size = logits.shape
    argmax_ids = kernels.argmax(logits)  # [N, Q]; widening to fp32 is exact, so the argmax needs none
    if params is None and num_query == 1:  # greedy decode: the argmax and a zero fill, rather than a dozen launches
        return argmax_ids, torch.zeros(num_seqs, dtype=torch.int64, device=logits.device)
    accepted = draft_ids == argmax_ids[:, :-1]
    if params is None:  # the accepted drafts are argmax tokens, and so is the one after them
        num_accepted = count_accepted(accepted)
        position = torch.arange(num_query, device=logits.device)
        return torch.where(position <= num_accepted[:, None], argmax_ids, PAD_TOKEN_ID), num_accepted
    probs = filtered_probs(logits.float().view(-1, vocab_size), params.repeat_rows(num_query), True, True, True)
    probs = probs.view(num_seqs, num_query, vocab_size)
    draft_probs = probs[:, :-1].gather(2, draft_ids[:, :, None]).squeeze(2)
    accepted = torch.where(params.is_greedy[:, None], accepted, uniforms[:, :-1] < draft_probs)
    num_accepted = count_accepted(accepted)
    greedy_ids = argmax_ids.gather(1, num_accepted[:, None]).squeeze(1)
    sampled_ids = sample_correction(probs, draft_ids, num_accepted, uniforms[:, -1])
    final_ids = torch.where(params.is_greedy, greedy_ids, sampled_ids)
    return emitted_tokens(draft_ids, num_accepted, final_ids), num_accepted


def token_logprobs(raw_logits: Tensor, token_ids: Tensor, num_top: int):
    """raw_logits [R, V], token_ids [R] (-1 = pad) -> (logprobs [R], (values [R, n], ids [R, n])
    or None when n == 0). Padded rows get PAD_LOGPROB / PAD_TOKEN_ID."""
    logprobs = torch.log_softmax(raw_logits, dim=-1)
    is_pad = token_ids < 0
    chosen = logprobs.gather(1, token_ids.clamp(min=0)[:, None]).squeeze(1)
    chosen = chosen.masked_fill(is_pad, PAD_LOGPROB)
    if num_top == 0:
        return chosen, None
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    top_values = top_values.masked_fill(is_pad[:, None], PAD_LOGPROB)
    top_ids = top_ids.masked_fill(is_pad[:, None], PAD_TOKEN_ID)
    return chosen, (top_values, top_ids)
