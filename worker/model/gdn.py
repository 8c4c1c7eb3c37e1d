"""Gated DeltaNet token mixer (the linear-attention layers of Qwen3-Next).

Qwen3-Next packs the projections per key-head group: in_proj_qkvz rows are, per group,
[q(dk) | k(dk) | v(r*dv) | z(r*dv)] and in_proj_ba rows [b(r) | a(r)], with r = nv / nk. Sharding
whole groups keeps each rank's rows contiguous. Qwen3.5 stores four separate projections instead.
In FP8 checkpoints the projections may be FP8 (the published ones keep in_proj_ba in bf16); the
conv weight, A_log, dt_bias and the norm always stay in the activation dtype.
"""

import torch
from torch import nn

from worker import kernels
from worker.config import ModelConfig
from worker.distributed import get_tp
from worker.kernels.fp8.quant import flatten_tokens
from worker.kernels.gdn_decode import split_qkv
from worker.model.context import get_context
from worker.model.layers.fp8 import check_whole_blocks, is_block_scale, narrow
from worker.model.layers.linear import (ColumnParallelLinear, Fp8AndDenseColumns, MergedColumnLinear,
                                        RowParallelLinear, _check_shape, project_columns)
from worker.model.layers.norm import GatedRMSNorm


class DepthwiseConvWeight(nn.Module):
    """Holds `conv1d.weight` as `[channels, kernel]` (the checkpoint's `[channels, 1, kernel]`)."""

    def __init__(self, channels: int, kernel: int, weight_loader):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel), requires_grad=False)
        self.weight.weight_loader = weight_loader


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, reduce_results: bool = True):
        super().__init__()
        self.tp = tp = get_tp()
        self.num_k_heads = tp.shard(config.linear_num_key_heads, "linear_num_key_heads")
        self.num_v_heads = config.linear_num_value_heads // tp.size
        self.ratio = config.gdn_group_ratio
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim  # per rank
        self.value_dim = self.num_v_heads * self.head_v_dim  # per rank
        self.conv_kernel = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        nk, nv, dk, dv = config.linear_num_key_heads, config.linear_num_value_heads, self.head_k_dim, self.head_v_dim

        self.split_projections = config.split_gdn_projections
        quant = dict(quant_config=config.quantization)
        if self.split_projections:
            self.in_proj_qkv = ColumnParallelLinear(hidden, 2 * nk * dk + nv * dv, **quant,
                                                    prefix=f"{prefix}.in_proj_qkv")
            self.in_proj_qkv.weight.weight_loader = self._load_conv_channels
            if self.in_proj_qkv.weight_scale_inv is not None:
                self.in_proj_qkv.weight_scale_inv.weight_loader = self._load_conv_channels
                for what, per_rank in (("query/key rows", self.key_dim), ("value rows", self.value_dim)):
                    check_whole_blocks(f"{prefix}.in_proj_qkv", what, per_rank, per_rank * tp.size, tp.size,
                                       self.in_proj_qkv.block, tp.size)
            self.in_proj_z = ColumnParallelLinear(hidden, nv * dv, **quant, prefix=f"{prefix}.in_proj_z")
            self.in_proj_b = ColumnParallelLinear(hidden, nv, **quant, prefix=f"{prefix}.in_proj_b")
            self.in_proj_a = ColumnParallelLinear(hidden, nv, **quant, prefix=f"{prefix}.in_proj_a")
        else:
            self.in_proj_qkvz = ColumnParallelLinear(hidden, nk * (2 * dk + 2 * self.ratio * dv), **quant,
                                                     prefix=f"{prefix}.in_proj_qkvz")
            self.in_proj_ba = ColumnParallelLinear(hidden, nk * 2 * self.ratio, **quant, prefix=f"{prefix}.in_proj_ba")
            # Column orders that turn the per-group packing into [q | k | v | z] and [b | a] in one gather.
            rdv = self.ratio * dv
            self.register_buffer("qkvz_order", _grouped_to_planar(self.num_k_heads, [dk, dk, rdv, rdv]),
                                 persistent=False)
            self.register_buffer("ba_order", _grouped_to_planar(self.num_k_heads, [self.ratio, self.ratio]),
                                 persistent=False)
            self.qkvz_planar = self.ba_planar = False  # rows reordered by after_loading
        # The input projections as one GEMM once loaded, or as one launch of an FP8 and a bf16 weight.
        self.projections: MergedColumnLinear | Fp8AndDenseColumns | None = None

        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = DepthwiseConvWeight(conv_dim, self.conv_kernel, self._load_conv_channels)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.A_log.weight_loader = self._load_value_heads
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.dt_bias.weight_loader = self._load_value_heads
        self.norm = GatedRMSNorm(dv, config.rms_norm_eps)
        self.out_proj = RowParallelLinear(nv * dv, hidden, reduce_results=reduce_results, **quant,
                                          prefix=f"{prefix}.out_proj")
        self.norm.quant_block = self.out_proj.block
        first = self.in_proj_qkv if self.split_projections else self.in_proj_qkvz
        self.fp8_input_block = first.block  # norm.RMSNorm
        self.conv_states: torch.Tensor | None = None  # [G, conv_dim, K-1+k], bound by the runner
        self.ssm_states: torch.Tensor | None = None  # [G, 1+k, HV, K, V]

    def _load_conv_channels(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Rows ordered [q of all heads | k of all heads | v of all heads]: take this rank's heads of each.

        Serves conv1d.weight ([C, 1, K] in the checkpoint) and Qwen3.5's in_proj_qkv ([C, H]) with, in FP8
        checkpoints, its block scales (whole blocks per part at tp > 1, checked when built)."""
        full_key, full_value = self.key_dim * self.tp.size, self.value_dim * self.tp.size
        rows = 2 * full_key + full_value
        if is_block_scale(param):
            expected = (-(-rows // param.weight_block), param.shape[1])
        else:
            expected = (rows, 1, param.shape[1]) if loaded.dim() == 3 else (rows, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {expected}")
        if self.tp.size == 1:  # one part may end inside the block where the next begins
            param.data.copy_(loaded.full().reshape(param.shape))
            return
        rank = self.tp.rank
        parts = [
            narrow(param, loaded, 0, rank * self.key_dim, self.key_dim),
            narrow(param, loaded, 0, full_key + rank * self.key_dim, self.key_dim),
            narrow(param, loaded, 0, 2 * full_key + rank * self.value_dim, self.value_dim),
        ]
        param.data.copy_(torch.cat([p.reshape(p.shape[0], -1) for p in parts]))

    def _load_value_heads(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        expected = (self.num_v_heads * self.tp.size,)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {expected}")
        shard = loaded.narrow(0, self.tp.rank * self.num_v_heads, self.num_v_heads)
        _check_shape(param, shard)
        param.data.copy_(shard)

    def after_loading(self) -> None:
        """Reorder the packed projections' rows once into [q | k | v | z] and [b | a], so that the forward
        reads them without a column gather (an FP8 weight only where its runs are whole blocks, as at
        Qwen3-Next's sizes). The parameters then hold the rows in that order, no longer the checkpoint's.
        The input projections then multiply as one GEMM where they are of one kind, and where the FP8
        releases keep in_proj_ba bf16, in one launch of two kinds at decode sizes."""
        if not self.split_projections:
            if not self.qkvz_planar:
                self.qkvz_planar = self.in_proj_qkvz.reorder_output_rows(self.qkvz_order)
            if not self.ba_planar:
                self.ba_planar = self.in_proj_ba.reorder_output_rows(self.ba_order)
        if self.projections is None:
            parts = self._input_projections()
            self.projections = MergedColumnLinear.of(parts) or Fp8AndDenseColumns.of(parts)

    def _input_projections(self) -> list[ColumnParallelLinear]:
        if self.split_projections:
            return [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]
        return [self.in_proj_qkvz, self.in_proj_ba]

    def _project(self, hidden_states: torch.Tensor):
        """-> mixed_qkv [T, conv_dim] (conv input order), z [T, HV, V], b [T, HV], a [T, HV]."""
        tokens = hidden_states.shape[0]
        outputs = project_columns(self.projections, self._input_projections(), hidden_states)
        if self.split_projections:
            qkv, z, b, a = outputs
            return qkv, z.view(tokens, self.num_v_heads, self.head_v_dim), b, a
        conv_dim = 2 * self.key_dim + self.value_dim
        qkvz, ba = outputs
        if not self.qkvz_planar:
            qkvz = qkvz.index_select(1, self.qkvz_order)
        if not self.ba_planar:
            ba = ba.index_select(1, self.ba_order)
        z = qkvz[:, conv_dim:].view(tokens, self.num_v_heads, self.head_v_dim)
        return qkvz[:, :conv_dim], z, ba[:, : self.num_v_heads], ba[:, self.num_v_heads :]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        meta = get_context().gdn
        tokens = hidden_states.shape[0]
        mixed_qkv, z, b, a = self._project(hidden_states)
        n_dec, q_len, n_tok = meta.num_decodes, meta.decode_query_len, meta.num_decode_tokens
        if n_dec and n_tok == tokens:  # decode / verify only (every CUDA-graph step): one op after the projections
            return self.out_proj(flatten_tokens(self._decode(mixed_qkv, z, a, b, meta, n_dec, q_len)))
        core = torch.empty(tokens, self.num_v_heads, self.head_v_dim, dtype=hidden_states.dtype,
                           device=hidden_states.device)
        if n_dec:
            core[:n_tok] = self._recurrent(mixed_qkv[:n_tok], a[:n_tok], b[:n_tok], meta, n_dec, q_len)
        if n_tok < tokens:
            g, beta = kernels.gdn_gating(a[n_tok:], b[n_tok:], self.A_log, self.dt_bias)
            core[n_tok:] = self._chunked(mixed_qkv[n_tok:], g, beta, meta, n_dec)
        out = self.norm(core, z)  # [T, HV, V]; z may be rows of the projection's output
        return self.out_proj(flatten_tokens(out))

    def _decode(self, mixed_qkv, z, a, b, meta, n_dec, q_len):
        """Conv, gating, recurrence and the gated norm of a decode / verify batch -> [T, HV, V], with the out
        projection's e4m3 groups where it reads them (one op: its Triton forms in triton_gdn_decode)."""
        lead = (n_dec, q_len)
        return kernels.gdn_decode(
            mixed_qkv.view(*lead, -1), z.view(*lead, self.num_v_heads, self.head_v_dim),
            a.view(*lead, -1), b.view(*lead, -1), self.conv1d.weight, self.conv_states, self.A_log, self.dt_bias,
            self.ssm_states, self.norm.weight, self.norm.eps, meta.state_indices[:n_dec], meta.num_accepted[:n_dec],
            self.norm.quant_block)

    def _recurrent(self, mixed_qkv, a, b, meta, n_dec, q_len):
        slots, accepted = meta.state_indices[:n_dec], meta.num_accepted[:n_dec]
        x = kernels.causal_conv1d_update(
            mixed_qkv.view(n_dec, q_len, -1), self.conv1d.weight, self.conv_states, slots, accepted
        )
        q, k, v = split_qkv(x, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        out = kernels.fused_gating_recurrent_gated_delta_rule(
            q, k, v, a.view(n_dec, q_len, -1), b.view(n_dec, q_len, -1), self.A_log, self.dt_bias, self.ssm_states,
            slots, accepted,
        )
        return out.reshape(n_dec * q_len, self.num_v_heads, self.head_v_dim)

    def _chunked(self, mixed_qkv, g, beta, meta, n_dec):
        slots, accepted = meta.state_indices[n_dec:], meta.num_accepted[n_dec:]
        has_init, cu = meta.has_initial_state[n_dec:], meta.prefill_cu_seqlens
        x = kernels.causal_conv1d_fn(mixed_qkv, self.conv1d.weight, cu, self.conv_states, slots, accepted, has_init)
        q, k, v = split_qkv(x, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        return kernels.chunk_gated_delta_rule(q, k, v, g, beta, cu, self.ssm_states, slots, accepted, has_init)


def _grouped_to_planar(num_groups: int, widths: list[int]) -> torch.Tensor:
    """Columns [g0: p0 p1 .. | g1: p0 p1 .. | ..] -> [p0 of every group | p1 of every group | ..], as indices."""
    group_width = sum(widths)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return torch.tensor([g * group_width + start + i for start, width in zip(starts, widths)
                         for g in range(num_groups) for i in range(width)], dtype=torch.int64)
