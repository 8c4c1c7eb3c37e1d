"""Small helpers shared by the model tests: drive our model through its caches, one step at a time.

`ModelDriver` owns the KV blocks and GDN state groups of a handful of sequences and turns
"prefill these tokens" / "decode these tokens" into `SequenceSlice`s, the way the runner will:

    driver = ModelDriver(model)
    seq = driver.new_sequence()
    [logits] = driver.run([driver.prefill(seq, prompt)])
    [logits] = driver.run([driver.decode(seq, [next_token])])
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.near_ties import RoutingWatch, assert_no_near_tie, has_router
from worker.engine.cache_tensors import CacheShapes, allocate_and_bind
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.model.context import forward_context
from worker.model.loader import load_model


@dataclass
class Sequence:
    """Cache bookkeeping of one sequence: how many tokens are in the caches, which slot to start from."""

    group: int
    block_table: list[int]
    length: int = 0  # tokens whose KV / GDN state is in the caches
    num_accepted: int = 1  # the GDN state to start from is slot num_accepted - 1

    def reject(self, count: int) -> None:
        """Drop the last `count` tokens of the previous decode/verify step (rejected drafts)."""
        self.length -= count
        self.num_accepted -= count
        assert self.num_accepted >= 1


class ModelDriver:
    """Owns the caches of our model and runs steps made of prefill / decode slices."""

    def __init__(self, model, num_spec_tokens: int = 0, block_size: int = 16, max_seqs: int = 8,
                 max_len: int = 256, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.decode_query_len = 1 + num_spec_tokens
        self.blocks_per_seq = -(-max_len // block_size)
        num_blocks = max_seqs * self.blocks_per_seq
        shapes = CacheShapes.for_model(model, block_size, num_spec_tokens, torch.float32)
        allocate_and_bind(model, shapes, num_blocks, max_seqs, "cpu")
        # Shuffled block ids so that a sequence's blocks are not contiguous in the cache.
        self._free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        # Hand out state groups from the top so that group ids differ from sequence order.
        self._free_groups = list(range(max_seqs))
        self.last_hidden: torch.Tensor | None = None

    def new_sequence(self) -> Sequence:
        blocks = [self._free_blocks.pop() for _ in range(self.blocks_per_seq)]
        return Sequence(group=self._free_groups.pop(), block_table=blocks)

    def prefill(self, seq: Sequence, token_ids: list[int]) -> SequenceSlice:
        """The next `token_ids` of `seq` as a prefill chunk (continuing from the cached state)."""
        s = SequenceSlice(list(token_ids), seq.length, seq.block_table, seq.group, seq.num_accepted, is_decode=False)
        seq.length += len(token_ids)
        seq.num_accepted = 1  # prefill writes its final state to slot 0
        return s

    def decode(self, seq: Sequence, token_ids: list[int]) -> SequenceSlice:
        """A decode / verify slice; every token counts as accepted until `seq.reject(n)`."""
        assert len(token_ids) == self.decode_query_len
        s = SequenceSlice(list(token_ids), seq.length, seq.block_table, seq.group, seq.num_accepted, is_decode=True)
        seq.length += len(token_ids)
        seq.num_accepted = len(token_ids)  # the state after position j is in slot j
        return s

    @torch.no_grad()
    def run(self, slices: list[SequenceSlice]) -> list[torch.Tensor]:
        """One step; -> logits [num_tokens, vocab] of each slice. The hidden states stay in `last_hidden`."""
        input_ids, positions, ctx = build_step_inputs(slices, self.block_size, self.decode_query_len, "cpu")
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        self.last_hidden = hidden
        logits = self.model.compute_logits(hidden)
        return list(logits.split([s.num_tokens for s in slices]))


def load_hf(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_ours(model_dir) -> torch.nn.Module:
    return load_model(model_dir, torch.float32)


@torch.no_grad()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """HF logits [len, vocab] for one sequence run from scratch (row p predicts token p+1).

    Fails if HF routes any position on a near-tie: every caller compares what follows from these
    logits with our model, so the fixed test data must be tie-free (see tests/near_ties.py)."""
    if not has_router(hf_model):
        return hf_model(torch.tensor([token_ids])).logits[0]
    with RoutingWatch(hf_model) as watch:
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    assert_no_near_tie(watch.near_ties(), f"HF routing of a {len(token_ids)}-token sequence")
    return logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def read_checkpoint(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder, as stored."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for file in files:
        tensors.update(load_file(model_dir / file))
    return tensors
