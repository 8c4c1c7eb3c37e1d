"""Vocab-parallel embedding and lm_head: each rank holds a contiguous slice of the vocabulary."""

import torch
import torch.nn.functional as F
from torch import nn

from worker import kernels
from worker.distributed import get_tp


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp()
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + self.tp.size - 1) // self.tp.size
        self.start = self.tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects "
                             f"{(self.vocab_size, param.shape[1])} before sharding")
        rows = loaded.narrow(0, self.start, max(0, min(self.per_rank, self.vocab_size - self.start)))
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def local_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The rows of `token_ids` in this rank's slice, zero rows for ids outside it."""
        local = token_ids - self.start
        mine = (local >= 0) & (local < self.per_rank)
        return F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine[:, None].to(self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        return self.tp.all_reduce(self.local_rows(input_ids))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the whole vocabulary, gathered from every rank's slice (identical on all ranks)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = kernels.linear(hidden_states, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[:, : self.vocab_size]


class DraftVocabHead(nn.Module):
    """The lm_head's rows of a draft vocabulary (`token_ids`, worker.engine.token_map): logits over those
    ids alone, column j for token_ids[j], the same on every rank.

    Each rank keeps the map's rows that lie in its vocabulary slice and zeros for the others, so the
    ranks' products sum (one all-reduce of [T, M]) to the logits exactly: every column has one rank's
    value and zeros."""

    def __init__(self, lm_head: ParallelLMHead, token_ids: torch.Tensor):
        super().__init__()
        self.tp = lm_head.tp
        self.register_buffer("token_ids", token_ids.to(lm_head.weight.device), persistent=False)
        self.register_buffer("weight", lm_head.local_rows(self.token_ids), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, M]
        logits = kernels.linear(hidden_states, self.weight)
        return logits if self.tp.size == 1 else self.tp.all_reduce(logits)
