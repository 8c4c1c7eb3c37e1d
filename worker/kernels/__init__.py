"""Ops of the model, each as a torch reference (any device, the source of truth).

Layers call the ops through this module so that the fast kernels, once written, replace the
references in one place.
"""

from worker.kernels.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from worker.kernels.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, gdn_gating
from worker.kernels.moe import fused_moe, select_experts
from worker.kernels.paged_attention import paged_attention, reshape_and_cache

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gdn_gating",
    "fused_moe",
    "select_experts",
    "paged_attention",
    "reshape_and_cache",
]
