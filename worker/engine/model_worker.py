"""What every tensor-parallel rank holds: its model shard, its caches and a runner.

Rank 0 adds the scheduler on top (LLMEngine); the other ranks only execute the plans it sends.
"""

import logging

import torch

from worker.config import ModelConfig
from worker.engine.cache_tensors import CacheShapes, allocate_and_bind
from worker.engine.config import EngineConfig
from worker.engine.decode_graphs import DecodeGraphs
from worker.engine.memory import CachePlan, cuda_cache_budget, plan_cache
from worker.engine.proposer import MTPProposer, Proposer
from worker.engine.runner import ModelRunner
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.engine.token_map import load_token_map
from worker.kernels import set_kernel_backend
from worker.model.context import forward_context
from worker.model.loader import load_model

logger = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, config: EngineConfig, device: torch.device, agree=None, proposer: Proposer | None = None):
        """`agree(plan) -> plan` makes every rank use the same cache sizes (the minimum over ranks)."""
        self.config = config
        self.device = device
        set_kernel_backend(config.kernel_backend)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.model = load_model(config.model, config.torch_dtype, device, self.model_config, progress=True,
                                load_format=config.load_format)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        k = config.speculative_tokens
        self.shapes = CacheShapes.for_model(self.model, config.block_size, k, config.torch_dtype,
                                            config.torch_ssm_dtype)
        if k and proposer is None:
            token_map = None
            if config.speculative_token_map:
                token_map = load_token_map(config.speculative_token_map, self.model_config.vocab_size)
            proposer = MTPProposer(self.model, k, config.block_size, token_map)
        # A proposer that drafts on the host (no drafts_in_graph) gets each step's tokens from the runner.
        in_graph = proposer if getattr(proposer, "drafts_in_graph", False) else None
        self.decode_graphs = DecodeGraphs(
            self.model, in_graph, k, config.block_size, config.max_num_seqs, self.max_model_len, device,
            config.cuda_graph_sizes)
        self.cache_plan = self._plan_cache()
        if agree is not None:
            self.cache_plan = agree(self.cache_plan)
        allocate_and_bind(self.model, self.shapes, self.cache_plan.num_blocks, self.cache_plan.num_state_groups,
                          device)
        self.runner = ModelRunner(self.model, config.block_size, k, device, proposer, config.seed,
                                  self.model_config.eos_token_ids)
        self.runner.decode_graphs = self.decode_graphs
        if self.uses_cuda_graphs:
            with torch.inference_mode():
                self.decode_graphs.capture(progress=True)

    def release(self) -> None:
        """Drop the graphs and the caches now rather than whenever the garbage collector gets to them."""
        self.decode_graphs.release()
        allocate_and_bind(self.model, self.shapes, 0, 0, self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager

    def _plan_cache(self) -> CachePlan:
        if self.device.type == "cuda":
            budget = cuda_cache_budget(self.config.gpu_memory_utilization, self._profile_step)
            if self.uses_cuda_graphs:  # the graphs keep their largest step's activations for good
                budget -= self._graph_memory
                logger.info("reserved %.1f MiB for CUDA graphs", self._graph_memory / 2**20)
        else:
            budget = self.config.cache_memory_bytes
        return plan_cache(budget, self.shapes, self.config.max_num_seqs, self.config.num_kv_blocks)

    @torch.inference_mode()
    def _profile_step(self) -> None:
        """With CUDA graphs the largest decode step (what the graphs will keep), then a prefill of a full
        token budget, on throwaway caches, to measure peak activation memory."""
        self._graph_memory = 0
        if self.uses_cuda_graphs:
            allocate_and_bind(self.model, self.shapes, 1, 1, self.device)
            self._graph_memory = self.decode_graphs.profile_memory()
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len - 1)
        num_blocks = num_tokens // self.config.block_size + 2
        allocate_and_bind(self.model, self.shapes, num_blocks, 1, self.device)
        slice_ = SequenceSlice([0] * num_tokens, 0, list(range(num_blocks)), state_group=0)
        input_ids, positions, ctx = build_step_inputs([slice_], self.config.block_size, 1, self.device)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        self.model.compute_logits(hidden[-1:])
        allocate_and_bind(self.model, self.shapes, 0, 0, self.device)
