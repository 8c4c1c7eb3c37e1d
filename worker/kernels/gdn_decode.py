"""The Gated DeltaNet's decode / verify step after its input projections, torch reference.

Four ops in their order: the causal conv1d update of the q/k/v channels (causal_conv1d), the gating
and the gated delta rule from slot num_accepted-1 (gated_delta_rule), and the gated output norm
(gated_rms_norm), each exactly as its own reference computes it. The Triton kernel
(triton_gdn_decode) does them in one launch, one program per (key head, sequence).
"""

import torch

from worker.kernels.causal_conv1d import causal_conv1d_update
from worker.kernels.gated_delta_rule import fused_gating_recurrent_gated_delta_rule
from worker.kernels.gated_rms_norm import gated_rms_norm


def split_qkv(x: torch.Tensor, value_heads: int, head_k_dim: int, head_v_dim: int):
    """x [N, Q, D] with D = 2 H K + HV V in conv channel order [q | k | v] -> q, k [N, Q, H, K], v [N, Q, HV, V]."""
    key_dim = (x.shape[-1] - value_heads * head_v_dim) // 2
    q, k, v = x.split([key_dim, key_dim, value_heads * head_v_dim], dim=-1)
    lead = x.shape[:-1]
    return (q.reshape(*lead, -1, head_k_dim), k.reshape(*lead, -1, head_k_dim),
            v.reshape(*lead, value_heads, head_v_dim))


def gdn_decode(
    mixed_qkv: torch.Tensor,  # [N, Q, D] the projections' conv channels [q | k | v], Q = 1 + k
    z: torch.Tensor,  # [N, Q, HV, V] the output gate
    a: torch.Tensor,  # [N, Q, HV] the decay projection
    b: torch.Tensor,  # [N, Q, HV] the beta projection
    conv_weight: torch.Tensor,  # [D, KW]
    conv_states: torch.Tensor,  # [G, D, KW-1+k]
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    norm_weight: torch.Tensor,  # [V]
    eps: float,
    state_indices: torch.Tensor,  # [N] slot group, PAD (<0) skips the sequence (zeros out)
    num_accepted: torch.Tensor,  # [N]
    quant_block: int | None = None,  # the output also carries its e4m3 groups (with_token_groups)
) -> torch.Tensor:  # [N * Q, HV, V] in mixed_qkv's dtype
    return decode_in_steps((causal_conv1d_update, fused_gating_recurrent_gated_delta_rule, gated_rms_norm),
                           mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states, norm_weight, eps,
                           state_indices, num_accepted, quant_block)


def decode_in_steps(ops, mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states, norm_weight, eps,
                    state_indices, num_accepted, quant_block):
    """gdn_decode as its ops one after another, ops = (conv update, gated recurrence, gated norm): the
    references here, the Triton kernels in triton_gdn_decode's form "three"."""
    conv_update, gated_recurrence, gated_norm = ops
    N, Q, _ = mixed_qkv.shape
    HV, K, V = ssm_states.shape[2:]
    x = conv_update(mixed_qkv, conv_weight, conv_states, state_indices, num_accepted)
    q, k, v = split_qkv(x, HV, K, V)
    core = gated_recurrence(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, num_accepted)
    return gated_norm(core.reshape(N * Q, HV, V), z.reshape(N * Q, HV, V), norm_weight, eps, quant_block)
