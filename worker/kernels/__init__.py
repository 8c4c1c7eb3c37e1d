"""Ops of the model. Layers call them through this module, which picks the implementation.

Each op exists twice: a torch reference (any device, the source of truth) and a Triton kernel with
the same parameters: `worker.kernels.<op>` beside `worker.kernels.triton_<op>` for the Gated DeltaNet
ops and paged attention, `worker.kernels.moe.{reference,triton}` for the sparse MoE. With the
backend "auto" (the default), CUDA tensors go to the Triton kernels and everything else to the
references; `set_kernel_backend("torch")` forces the references on a GPU for comparison, `"triton"`
forces the kernels (on the CPU that needs TRITON_INTERPRET=1 before triton is imported).

The block-scaled FP8 ops have their Triton kernels in `worker.kernels.fp8.triton` (`fp8_block_linear`)
and `worker.kernels.moe.triton_fp8` (`fused_moe_fp8`), for power-of-two blocks of 16 or more (others
take the references).

The norms before FP8 layers take a `quant_block`: on the Triton path they then also write the e4m3
groups of their output (attach_token_groups), which the FP8 linear and MoE kernels read instead of
quantising again. The references ignore it: their FP8 ops quantise for themselves.
"""

import importlib

from worker.kernels import add_rms_norm as _norm_ref
from worker.kernels import argmax as _argmax_ref
from worker.kernels import causal_conv1d as _conv_ref
from worker.kernels import continue_decode as _continue_ref
from worker.kernels import decode_metadata as _meta_ref
from worker.kernels.fp8 import reference as _fp8_ref
from worker.kernels.fp8.quant import attached_token_groups, kernel_block, quantisable
from worker.kernels import gated_delta_rule as _gdn_ref
from worker.kernels import gated_rms_norm as _gated_norm_ref
from worker.kernels import gdn_decode as _gdn_decode_ref
from worker.kernels import linear as _linear_ref
from worker.kernels import one_shot_add_rms_norm as _one_shot_ref
from worker.kernels import paged_attention as _attn_ref
from worker.kernels import qk_norm_rope as _qk_ref
from worker.kernels.moe import fp8_reference as _moe_fp8_ref
from worker.kernels.moe import reference as _moe_ref

BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_kernel_backend(name: str) -> None:
    """Select the implementation of every op: "auto" (Triton on CUDA tensors), "torch" or "triton"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name


def get_kernel_backend() -> str:
    return _backend


def _triton_module(name: str):
    # Imported on first use: triton is only needed where the kernels run.
    return importlib.import_module(f"worker.kernels.triton_{name}")


def _use_triton(x) -> bool:
    return _backend == "triton" or (_backend == "auto" and x.is_cuda)


def gdn_gating(a, b, A_log, dt_bias):
    if _use_triton(a):
        return _triton_module("gated_delta_rule").gdn_gating(a, b, A_log, dt_bias)
    return _gdn_ref.gdn_gating(a, b, A_log, dt_bias)


def chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, ssm_states, state_indices, num_accepted,
                           has_initial_state, scale=None, use_qk_l2norm=True):
    impl = _triton_module("gated_delta_rule") if _use_triton(q) else _gdn_ref
    return impl.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, ssm_states, state_indices, num_accepted,
                                       has_initial_state, scale=scale, use_qk_l2norm=use_qk_l2norm)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, ssm_states, state_indices, num_accepted, scale=None,
                                     use_qk_l2norm=True):
    impl = _triton_module("gated_delta_rule") if _use_triton(q) else _gdn_ref
    return impl.fused_recurrent_gated_delta_rule(q, k, v, g, beta, ssm_states, state_indices, num_accepted,
                                                 scale=scale, use_qk_l2norm=use_qk_l2norm)


def fused_gating_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, num_accepted,
                                            scale=None, use_qk_l2norm=True):
    impl = _triton_module("gated_delta_rule") if _use_triton(q) else _gdn_ref
    return impl.fused_gating_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices,
                                                        num_accepted, scale=scale, use_qk_l2norm=use_qk_l2norm)


def causal_conv1d_fn(x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state,
                     activation="silu"):
    impl = _triton_module("causal_conv1d") if _use_triton(x) else _conv_ref
    return impl.causal_conv1d_fn(x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state,
                                 activation=activation)


def causal_conv1d_update(x, weight, conv_states, state_indices, num_accepted, activation="silu"):
    impl = _triton_module("causal_conv1d") if _use_triton(x) else _conv_ref
    return impl.causal_conv1d_update(x, weight, conv_states, state_indices, num_accepted, activation=activation)


def _kernel_quant_block(quant_block):
    """The group size an FP8 consumer's Triton kernel reads, else None."""
    return quant_block if quant_block is not None and kernel_block(quant_block) else None


def gated_rms_norm(x, z, weight, eps, quant_block=None):
    if _use_triton(x):
        impl = _triton_module("gated_rms_norm")
        block = _kernel_quant_block(quant_block)
        return impl.gated_rms_norm(x, z, weight, eps, block if quantisable(x.shape[-1], block) else None)
    return _gated_norm_ref.gated_rms_norm(x, z, weight, eps)


def gdn_decode(mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states, norm_weight, eps,
               state_indices, num_accepted, quant_block=None):
    """The GDN's decode / verify step after its input projections: conv, gating, recurrence, gated norm."""
    args = (mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states, norm_weight, eps,
            state_indices, num_accepted)
    if _use_triton(mixed_qkv):
        return _triton_module("gdn_decode").gdn_decode(*args, _kernel_quant_block(quant_block))
    return _gdn_decode_ref.gdn_decode(*args)


def fused_add_rms_norm(x, residual, weight, eps, quant_block=None):
    if _use_triton(x):
        return _triton_module("add_rms_norm").fused_add_rms_norm(x, residual, weight, eps,
                                                                  _kernel_quant_block(quant_block))
    return _norm_ref.fused_add_rms_norm(x, residual, weight, eps)


def fused_add_rms_norm_linear(x, residual, weight, eps, linear_weight, quant_block=None):
    if _use_triton(x):
        return _triton_module("add_rms_norm").fused_add_rms_norm_linear(x, residual, weight, eps, linear_weight,
                                                                         _kernel_quant_block(quant_block))
    return _norm_ref.fused_add_rms_norm_linear(x, residual, weight, eps, linear_weight)


def one_shot_add_rms_norm(x, peers, residual, weight, eps, quant_block=None):
    """fused_add_rms_norm of residual + x summed over the ranks through their peer-memory rows (`peers`)."""
    if _use_triton(x):
        return _triton_module("one_shot_add_rms_norm").one_shot_add_rms_norm(x, peers, residual, weight, eps,
                                                                             _kernel_quant_block(quant_block))
    return _one_shot_ref.one_shot_add_rms_norm(x, peers, residual, weight, eps)


def decode_metadata(start, block_tables, valid, query_len, block_size):
    impl = _triton_module("decode_metadata") if _use_triton(start) else _meta_ref
    return impl.decode_metadata(start, block_tables, valid, query_len, block_size)


def continue_decode_inputs(token_ids, num_accepted, drafts, positions, input_ids, start, accepted_slot):
    impl = _triton_module("continue_decode") if _use_triton(token_ids) else _continue_ref
    return impl.continue_decode_inputs(token_ids, num_accepted, drafts, positions, input_ids, start, accepted_slot)


def argmax(logits):
    impl = _triton_module("argmax") if _use_triton(logits) else _argmax_ref
    return impl.argmax(logits)


def rms_norm(x, weight, eps, quant_block=None):
    if x.dim() != 2 or not _use_triton(x):  # the kernel takes rows of tokens; other shapes stay with the reference
        return _norm_ref.rms_norm(x, weight, eps)
    return _triton_module("add_rms_norm").rms_norm(x, weight, eps, _kernel_quant_block(quant_block))


def _moe_impl(x):
    return importlib.import_module("worker.kernels.moe.triton") if _use_triton(x) else _moe_ref


def select_experts(router_logits, top_k, renormalize, shared_gate=False):
    return _moe_impl(router_logits).select_experts(router_logits, top_k, renormalize, shared_gate=shared_gate)


def fused_moe(hidden_states, w13, w2, topk_weights, topk_ids):
    return _moe_impl(hidden_states).fused_moe(hidden_states, w13, w2, topk_weights, topk_ids)


def linear(x, weight, bias=None):
    impl = _triton_module("linear") if _use_triton(x) else _linear_ref
    return impl.linear(x, weight, bias)


def fp8_block_linear(x, weight, weight_scale_inv, block, bias=None):
    if _use_triton(x) and kernel_block(block):
        return importlib.import_module("worker.kernels.fp8.triton").w8a8_block_fp8_linear(
            x, weight, weight_scale_inv, block, bias, x_groups=attached_token_groups(x, block))
    return _fp8_ref.w8a8_block_fp8_linear(x, weight, weight_scale_inv, block, bias)


def fp8_block_linear_with_dense(x, weight, weight_scale_inv, block, dense_weight):
    """(fp8_block_linear(x, weight, ...), linear(x, dense_weight)): on the Triton path one launch where it can."""
    if _use_triton(x) and kernel_block(block):
        return importlib.import_module("worker.kernels.fp8.triton").w8a8_block_fp8_linear_with_dense(
            x, weight, weight_scale_inv, block, dense_weight, x_groups=attached_token_groups(x, block))
    return _fp8_ref.w8a8_block_fp8_linear_with_dense(x, weight, weight_scale_inv, block, dense_weight)


def fused_moe_fp8(hidden_states, w13, w2, w13_scale_inv, w2_scale_inv, topk_weights, topk_ids, block):
    if _use_triton(hidden_states) and kernel_block(block) and w2.shape[-1] % block == 0:
        return importlib.import_module("worker.kernels.moe.triton_fp8").fused_moe_fp8(
            hidden_states, w13, w2, w13_scale_inv, w2_scale_inv, topk_weights, topk_ids, block,
            x_groups=attached_token_groups(hidden_states, block))
    return _moe_fp8_ref.fused_moe_fp8(hidden_states, w13, w2, w13_scale_inv, w2_scale_inv, topk_weights, topk_ids,
                                      block)


def _attention_impl(x):
    return _triton_module("paged_attention") if _use_triton(x) else _attn_ref


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping):
    return _attention_impl(key).reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def qk_norm_rope_and_cache(query, key, value, q_norm_weight, k_norm_weight, eps, cos_sin, positions, k_cache,
                           v_cache, slot_mapping):
    impl = _triton_module("qk_norm_rope") if _use_triton(query) else _qk_ref
    return impl.qk_norm_rope_and_cache(query, key, value, q_norm_weight, k_norm_weight, eps, cos_sin, positions,
                                       k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_context_len=0,
                    output_gate=None, quant_block=None):
    if _use_triton(query):
        return _triton_module("paged_attention").paged_attention(
            query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_context_len, output_gate,
            _kernel_quant_block(quant_block))
    return _attn_ref.paged_attention(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                     max_context_len, output_gate)


__all__ = [
    "BACKENDS",
    "set_kernel_backend",
    "get_kernel_backend",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_gating_recurrent_gated_delta_rule",
    "gdn_gating",
    "fused_moe",
    "fused_moe_fp8",
    "fp8_block_linear",
    "fp8_block_linear_with_dense",
    "select_experts",
    "paged_attention",
    "reshape_and_cache",
    "qk_norm_rope_and_cache",
    "fused_add_rms_norm",
    "fused_add_rms_norm_linear",
    "one_shot_add_rms_norm",
    "rms_norm",
    "decode_metadata",
    "argmax",
    "continue_decode_inputs",
    "gated_rms_norm",
]
