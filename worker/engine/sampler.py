"""Token sampling and speculative-draft verification, in pure torch (CPU or CUDA).

Pipeline per row: penalties -> min_tokens stop masking -> (greedy: argmax) -> temperature -> top-k
-> top-p -> min-p -> probabilities -> one inverse-CDF draw. Rows whose request carries a seed draw
their uniforms from that request's own generator, so a seeded request yields the same tokens
whatever else shares the batch. Logprobs are those of the raw logits, as in vLLM.

Draws per step: `sample` takes one uniform per sampled (non-greedy) row; `verify_drafts` takes Q
per sampled sequence (Q-1 acceptance tests, then one for the correction/bonus token), whether or
not all are used, so a seeded stream advances the same way every step; with Q == 1 it is `sample`.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.engine.host_io import index_tensor, to_device
from worker.engine.sampling_params import SamplingParams
from worker.engine.sampling_ops import PAD_LOGPROB, PAD_TOKEN_ID  # noqa: F401 (part of this module's API)
from worker.engine.sampling_ops import (RowSamplingParams, count_accepted, emitted_tokens, filtered_probs,
                                        inverse_cdf, sample_correction, token_logprobs)

# Temperatures below this are clamped so that logits / temperature stays finite.
MIN_TEMPERATURE = 1e-6


class RequestSampling:
    """One request's sampling state: its params, its seeded generator and its penalty counts.

    The caller appends each emitted token with `append_output` (or to `output_token_ids`); the
    device-side counts used by penalties catch up lazily with only the new tokens, and exist only
    for requests with penalties ([V] fp32 counts + [V] bool prompt mask).
    `eos_token_ids` are masked, with `params.stop_token_ids`, until `params.min_tokens` tokens
    are out (not when `ignore_eos`).
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = ()):
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        eos = [] if params.ignore_eos else list(eos_token_ids)
        self.min_tokens_stop_ids = sorted(set(params.stop_token_ids) | set(eos))
        self._generator: torch.Generator | None = None
        self._prompt_mask: Tensor | None = None
        self._output_counts: Tensor | None = None
        self._num_counted_outputs = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output(self, token_ids: Iterable[int]) -> None:
        self.output_token_ids.extend(token_ids)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator (created on first use on `device`), or None if unseeded."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.params.seed)
        return self._generator

    def penalty_state(self, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """-> (prompt_mask [V] bool, output_counts [V] fp32), brought up to date with the outputs."""
        if self._prompt_mask is None:
            self._prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._prompt_mask[_ids_tensor(self.prompt_token_ids, vocab_size, device)] = True
        if self._output_counts is None or self._num_counted_outputs > self.num_output_tokens:
            self._output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self._num_counted_outputs = 0
        new_ids = self.output_token_ids[self._num_counted_outputs:]
        if new_ids:
            new_ids_tensor = _ids_tensor(new_ids, vocab_size, device)
            self._output_counts.index_add_(0, new_ids_tensor, torch.ones_like(new_ids_tensor,
                                                                              dtype=torch.float32))
            self._num_counted_outputs = self.num_output_tokens
        return self._prompt_mask, self._output_counts


@dataclass
class SampleResult:
    token_ids: Tensor  # [R] int64
    logprobs: Tensor | None = None  # [R] fp32, raw log-softmax at token_ids; None if no row asks
    top_logprobs: tuple[Tensor, Tensor] | None = None  # (values [R, n], ids [R, n]), n = max asked


@dataclass
class VerifyResult:
    num_accepted: Tensor  # [N] int64, accepted drafts, 0..Q-1
    token_ids: Tensor  # [N, Q] int64: accepted drafts, then the correction/bonus token, then -1s
    logprobs: Tensor | None = None  # [N, Q] fp32, padded with 0.0
    top_logprobs: tuple[Tensor, Tensor] | None = None  # ([N, Q, n], [N, Q, n]), padded 0.0 / -1

    @property
    def num_emitted(self) -> Tensor:
        return self.num_accepted + 1


@dataclass
class _ExtraTokens:
    """Tokens counted as generated beyond a row's recorded outputs, as flat (row, token, weight)."""

    row_index: Tensor  # [M] int64
    token_ids: Tensor  # [M] int64
    weights: Tensor  # [M] fp32: 1 counts, 0 is padding

    @classmethod
    def from_lists(cls, extra_tokens: list[list[int]], device) -> "_ExtraTokens":
        row_index = [r for r, ids in enumerate(extra_tokens) for _ in ids]
        token_ids = [t for ids in extra_tokens for t in ids]
        as_long = dict(dtype=torch.int64, device=device)
        return cls(to_device(row_index, **as_long), to_device(token_ids, **as_long),
                   torch.ones(len(token_ids), dtype=torch.float32, device=device))

    @classmethod
    def from_drafts(cls, draft_ids: Tensor) -> "_ExtraTokens":
        """Row j of sequence n (flat row n*Q + j) counts drafts d1..dj, i.e. draft_ids[n, :j]."""
        num_seqs, num_drafts = draft_ids.shape
        num_query = num_drafts + 1
        device = draft_ids.device
        seq = torch.arange(num_seqs, device=device).view(-1, 1, 1)
        row_in_seq = torch.arange(num_query, device=device).view(1, -1, 1)
        draft_pos = torch.arange(num_drafts, device=device).view(1, 1, -1)
        shape = (num_seqs, num_query, num_drafts)
        row_index = (seq * num_query + row_in_seq).expand(shape)
        token_ids = draft_ids.reshape(num_seqs, 1, num_drafts).expand(shape)
        weights = (draft_pos < row_in_seq).expand(shape).float()
        return cls(row_index.reshape(-1), token_ids.reshape(-1).long(), weights.reshape(-1))


def _ids_tensor(token_ids: list[int], vocab_size: int, device) -> Tensor:
    ids = to_device(token_ids, torch.int64, torch.device(device))
    return ids.clamp_(0, vocab_size - 1)


def _row_tensor(values: list, device, dtype=torch.float32) -> Tensor:
    return to_device(values, dtype, torch.device(device))


# ---------------------------------------------------------------------------------------------
# Logits processing: penalties and min_tokens


def _apply_penalties(logits: Tensor, rows: list[RequestSampling],
                     extra: "_ExtraTokens | None") -> Tensor:
    """logits [R, V] -> new [R, V] with repetition / presence / frequency penalties applied."""
    penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not penalised:
        return logits
    num_rows, vocab_size = logits.shape
    device = logits.device
    states = [rows[i].penalty_state(vocab_size, device) for i in penalised]
    prompt_mask = torch.stack([mask for mask, _ in states])  # [P, V]
    counts = torch.stack([c for _, c in states])  # [P, V], a copy: extras are added below
    index = index_tensor(penalised, device)
    if extra is not None and extra.row_index.numel():
        _add_extra_counts(counts, index, num_rows, extra)
    params = [rows[i].params for i in penalised]
    repetition = _row_tensor([p.repetition_penalty for p in params], device)[:, None]
    presence = _row_tensor([p.presence_penalty for p in params], device)[:, None]
    frequency = _row_tensor([p.frequency_penalty for p in params], device)[:, None]

    sub = logits[index]
    seen = prompt_mask | (counts > 0)
    repeated = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, repeated, sub)
    sub = sub - frequency * counts - presence * (counts > 0).float()
    return logits.index_copy(0, index, sub)


def _add_extra_counts(counts: Tensor, penalised_index: Tensor, num_rows: int,
                      extra: _ExtraTokens) -> None:
    """Add extra tokens of penalised rows into counts [P, V] (in place), without a host sync."""
    vocab_size = counts.shape[1]
    local_of_row = torch.full((num_rows,), -1, dtype=torch.int64, device=counts.device)
    local_of_row[penalised_index] = torch.arange(len(penalised_index), device=counts.device)
    local = local_of_row[extra.row_index]
    weights = extra.weights * (local >= 0)
    flat = local.clamp(min=0) * vocab_size + extra.token_ids.clamp(0, vocab_size - 1)
    counts.view(-1).index_add_(0, flat, weights)


def _mask_stops_before_min_tokens(logits: Tensor, rows: list[RequestSampling],
                                  num_extra_per_row: list[int]) -> Tensor:
    """Stop / EOS tokens get -inf while a row has fewer than min_tokens outputs."""
    vocab_size = logits.shape[1]
    row_index, token_ids = [], []
    for i, row in enumerate(rows):
        if row.num_output_tokens + num_extra_per_row[i] < row.params.min_tokens:
            stops = [t for t in row.min_tokens_stop_ids if t < vocab_size]
            row_index += [i] * len(stops)
            token_ids += stops
    if not row_index:
        return logits
    logits = logits.clone()
    as_long = dict(dtype=torch.int64, device=logits.device)
    logits[to_device(row_index, **as_long), to_device(token_ids, **as_long)] = float("-inf")
    return logits


def _processed_logits(logits: Tensor, rows: list[RequestSampling], extra_lists=None,
                      draft_ids: Tensor | None = None, num_extra_per_row=None) -> Tensor:
    """Raw logits [R, V] -> penalised and min_tokens-masked logits [R, V] (the input untouched).

    Extra generated tokens come either as per-row lists (`sample`) or as draft_ids [N, Q-1] for
    flat rows n*Q + j (`verify_drafts`, which then passes num_extra_per_row = j for each row).
    """
    extra = None
    if any(row.params.has_penalties for row in rows):
        if draft_ids is not None:
            extra = _ExtraTokens.from_drafts(draft_ids)
        elif extra_lists is not None:
            extra = _ExtraTokens.from_lists(extra_lists, logits.device)
    logits = _apply_penalties(logits, rows, extra)
    if num_extra_per_row is None:
        num_extra_per_row = [len(ids) for ids in extra_lists] if extra_lists else [0] * len(rows)
    return _mask_stops_before_min_tokens(logits, rows, num_extra_per_row)


def apply_penalties(logits: Tensor, rows: list[RequestSampling],
                    extra_tokens: list[list[int]] | None = None) -> Tensor:
    """logits [R, V] -> new [R, V]: repetition on prompt+output (+extra) tokens (positive logits
    divided, others multiplied), then frequency * count and presence on output (+extra) tokens."""
    extra = _ExtraTokens.from_lists(extra_tokens, logits.device) if extra_tokens else None
    return _apply_penalties(logits.float(), rows, extra)


# ---------------------------------------------------------------------------------------------
# Sampling distribution and draws


def sampling_columns(rows: list[RequestSampling], vocab_size: int) -> dict[str, list]:
    """The requests' sampling parameters per row, filters that are off normalised (top_k = V, top_p = 1,
    min_p = 0) and temperatures clamped away from 0: what the tensor-only sampling code reads."""
    params = [row.params for row in rows]
    return dict(
        is_greedy=[p.is_greedy for p in params],
        temperature=[max(p.temperature, MIN_TEMPERATURE) for p in params],
        top_k=[p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
    )


def row_sampling_params(rows: list[RequestSampling], vocab_size: int, device) -> RowSamplingParams:
    """The requests' sampling parameters as tensors [R] (`sampling_columns`)."""
    columns = sampling_columns(rows, vocab_size)
    return RowSamplingParams(
        is_greedy=_row_tensor(columns["is_greedy"], device, torch.bool),
        temperature=_row_tensor(columns["temperature"], device),
        top_k=_row_tensor(columns["top_k"], device, torch.int64),
        top_p=_row_tensor(columns["top_p"], device),
        min_p=_row_tensor(columns["min_p"], device),
    )


def _filtered_probs(logits: Tensor, rows: list[RequestSampling]) -> Tensor:
    """Processed logits [R, V] of sampled rows -> probabilities [R, V] after temperature, top-k,
    top-p and min-p (renormalised)."""
    vocab_size = logits.shape[1]
    params = [row.params for row in rows]
    use_top_k = any(0 < p.top_k < vocab_size for p in params)
    use_top_p = any(p.top_p < 1 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    return filtered_probs(logits, row_sampling_params(rows, vocab_size, logits.device), use_top_k, use_top_p,
                          use_min_p)


def draw_uniforms(rows: list[RequestSampling], num_draws: int, device,
                  default_generator: torch.Generator | None) -> Tensor:
    """-> [R, num_draws] uniforms in [0, 1): seeded rows from their own generator, the others from
    default_generator (torch's global one if None), in row order."""
    num_unseeded = sum(row.params.seed is None for row in rows)
    unseeded = iter(torch.rand(num_unseeded, num_draws, generator=default_generator,
                               device=device).unbind(0))
    per_row = [next(unseeded) if row.params.seed is None
               else torch.rand(num_draws, generator=row.generator(device), device=device)
               for row in rows]
    return torch.stack(per_row)


def target_probs(logits: Tensor, rows: list[RequestSampling],
                 extra_tokens: list[list[int]] | None = None) -> Tensor:
    """logits [R, V] -> the distribution [R, V] each row samples from (one-hot for greedy rows)."""
    logits = _processed_logits(logits.float(), rows, extra_tokens)
    probs = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[1]).float()
    sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
    if sampled:
        index = index_tensor(sampled, logits.device)
        probs[index] = _filtered_probs(logits[index], [rows[i] for i in sampled])
    return probs


# ---------------------------------------------------------------------------------------------
# Logprobs


def max_num_top_logprobs(rows: list[RequestSampling]) -> int | None:
    """None when no row asks for logprobs, else the largest top-n asked."""
    asked = [row.params.logprobs for row in rows if row.params.logprobs is not None]
    return max(asked) if asked else None


# ---------------------------------------------------------------------------------------------
# Public entry points


def sample(logits: Tensor, rows: list[RequestSampling],
           extra_tokens: list[list[int]] | None = None,
           default_generator: torch.Generator | None = None) -> SampleResult:
    """Draw one token per row.

    logits [R, V] fp32 raw model output; rows[r] the request of row r; extra_tokens[r] tokens to
    count as generated for row r beyond its recorded outputs (penalties, min_tokens).
    default_generator (on logits' device) serves unseeded rows; None means torch's global RNG.
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} requests were given")
    if extra_tokens is not None and len(extra_tokens) != len(rows):
        raise ValueError(f"extra_tokens has {len(extra_tokens)} rows but {len(rows)} requests were given")
    logits = logits.float()
    processed = _processed_logits(logits, rows, extra_tokens)
    token_ids = processed.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
    if sampled:
        index = index_tensor(sampled, logits.device)
        sampled_rows = [rows[i] for i in sampled]
        probs = _filtered_probs(processed[index], sampled_rows)
        uniforms = draw_uniforms(sampled_rows, 1, logits.device, default_generator)
        token_ids[index] = inverse_cdf(probs, uniforms[:, 0])
    result = SampleResult(token_ids=token_ids)
    num_top = max_num_top_logprobs(rows)
    if num_top is not None:
        result.logprobs, result.top_logprobs = token_logprobs(logits, token_ids, num_top)
    return result


def verify_drafts(logits: Tensor, draft_ids: Tensor, rows: list[RequestSampling],
                  default_generator: torch.Generator | None = None) -> VerifyResult:
    """Verify point-mass drafts (q(d) = 1) against the target model, exactly.

    logits [N, Q, V] fp32: row j of sequence n is the target after the sequence's tokens plus drafts
    d1..dj (penalties count those drafts); draft_ids [N, Q-1] int64. Greedy sequences accept while
    draft == argmax; sampled ones accept d_{j+1} when u < p_j(d_{j+1}) and on rejection draw from p_j
    without d_{j+1}; if all are accepted the bonus token comes from p_{Q-1}.
    """
    num_seqs, num_query, vocab_size = logits.shape
    if draft_ids.shape != (num_seqs, num_query - 1):
        raise ValueError(f"draft_ids has shape {tuple(draft_ids.shape)}, "
                         f"expected ({num_seqs}, {num_query - 1})")
    if len(rows) != num_seqs:
        raise ValueError(f"logits has {num_seqs} sequences but {len(rows)} requests were given")
    device = logits.device
    draft_ids = draft_ids.long()
    flat_logits = logits.float().reshape(num_seqs * num_query, vocab_size)
    flat_rows = [row for row in rows for _ in range(num_query)]
    processed = _processed_logits(flat_logits, flat_rows, draft_ids=draft_ids,
                                  num_extra_per_row=list(range(num_query)) * num_seqs)
    processed = processed.view(num_seqs, num_query, vocab_size)

    argmax_ids = processed.argmax(dim=-1)  # [N, Q]
    accepted = draft_ids == argmax_ids[:, :-1]  # [N, Q-1], right for greedy sequences
    sampled = [n for n, row in enumerate(rows) if not row.params.is_greedy]
    if sampled:
        index = index_tensor(sampled, device)
        sampled_rows = [rows[n] for n in sampled]
        probs = _filtered_probs(processed[index].view(-1, vocab_size),
                                [row for row in sampled_rows for _ in range(num_query)])
        probs = probs.view(len(sampled), num_query, vocab_size)
        uniforms = draw_uniforms(sampled_rows, num_query, device, default_generator)  # [M, Q]
        draft_probs = probs[:, :-1].gather(2, draft_ids[index][:, :, None]).squeeze(2)
        accepted[index] = uniforms[:, :-1] < draft_probs
    num_accepted = count_accepted(accepted)  # [N]

    final_ids = argmax_ids.gather(1, num_accepted[:, None]).squeeze(1)  # [N]
    if sampled:
        final_ids[index] = sample_correction(probs, draft_ids[index], num_accepted[index],
                                              uniforms[:, -1])
    token_ids = emitted_tokens(draft_ids, num_accepted, final_ids)

    result = VerifyResult(num_accepted=num_accepted, token_ids=token_ids)
    num_top = max_num_top_logprobs(rows)
    if num_top is not None:
        chosen, top = token_logprobs(flat_logits, token_ids.view(-1), num_top)
        result.logprobs = chosen.view(num_seqs, num_query)
        if top is not None:
            result.top_logprobs = (top[0].view(num_seqs, num_query, num_top),
                                   top[1].view(num_seqs, num_query, num_top))
    return result
