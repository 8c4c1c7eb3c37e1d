"""Depthwise causal conv1d (+ SiLU), Triton kernels (the torch reference is worker.kernels.causal_conv1d).

Prefill: one program per (chunk of BT tokens of one sequence, BD channels); taps that reach before
the sequence start read the conv state at column num_accepted-1 (zeros for a new sequence). The
last K-1 inputs go to state columns 0..K-2 in a second launch, after every read of the old state.

Decode / verify: one program per (sequence, BD channels) reads the window at column num_accepted-1,
writes the 1+k outputs and shifts the last K-1+k inputs into the state. Neither path syncs with the
host, so both can be captured in CUDA graphs.
"""

import math

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_gated_delta_rule import _check, _empty_output, _find_sequence

CHUNK = 64


@triton.jit
def _window_value(x, conv_states, pos, rel, seq_len, group, first_col, has_init, d, dmask,
                  stride_x_t, stride_s_g, stride_s_d):
    """Input at relative position `rel` of a sequence (x row `pos` if rel >= 0, else the state column
    first_col + rel), in x's dtype, for a [R, BD] block of positions."""
    in_x = (rel >= 0) & (rel < seq_len)
    xv = tl.load(x + pos[:, None] * stride_x_t + d[None, :], mask=in_x[:, None] & dmask[None, :], other=0.0)
    in_state = (rel < 0) & has_init
    col = first_col + rel
    sv = tl.load(conv_states + group * stride_s_g + d[None, :] * stride_s_d + col[:, None],
                 mask=in_state[:, None] & dmask[None, :], other=0.0)
    return tl.where((rel >= 0)[:, None], xv, sv.to(xv.dtype))


@triton.jit
def _conv_fwd_kernel(
    x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state, out,
    stride_x_t, stride_o_t, stride_s_g, stride_s_d, N, D,
    KW: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, LOG_N: tl.constexpr,
    SILU: tl.constexpr,
):
    chunk = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    n = _find_sequence(cu_seqlens, chunk, N, BT, LOG_N)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    cs = start + (chunk - start // BT - n) * BT
    if cs >= end:
        return
    rel = cs - start + tl.arange(0, BT)  # position within the sequence; 32-bit offsets from per-sequence bases
    rmask = rel < end - start
    x_seq = x + start.to(tl.int64) * stride_x_t
    o_ptr = out + start.to(tl.int64) * stride_o_t + rel[:, None] * stride_o_t + d[None, :]
    group = tl.load(state_indices + n).to(tl.int64)
    if group < 0:  # the reference leaves zeros in a skipped sequence's rows
        tl.store(o_ptr, tl.zeros([BT, BD], dtype=out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        return
    # The K-1 inputs before the sequence, as rows of a small tile: state columns a-1 .. a+K-3.
    has_init = tl.load(has_initial_state + n) != 0
    j = tl.arange(0, BW)
    first_col = tl.load(num_accepted + n).to(tl.int32) - 1
    prev = tl.load(conv_states + group * stride_s_g + d[None, :] * stride_s_d + (first_col + j)[:, None],
                   mask=((j < KW - 1)[:, None] & dmask[None, :]) & has_init & (cs == start), other=0.0)
    prev = prev.to(x.dtype.element_ty)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(KW):
        src = rel + (i - (KW - 1))  # relative input position of tap i
        val = tl.load(x_seq + src[:, None] * stride_x_t + d[None, :],
                      mask=((src >= 0) & (src < end - start))[:, None] & dmask[None, :], other=0.0)
        for c in tl.static_range(KW - 1 - i):  # only a sequence's first rows reach into the state
            row = tl.sum(tl.where((j == c + i)[:, None], prev, 0.0), 0)
            val = tl.where((src == c + i - (KW - 1))[:, None], row[None, :].to(val.dtype), val)
        w = tl.load(weight + d * KW + i, mask=dmask, other=0.0).to(tl.float32)
        acc += val.to(tl.float32) * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _conv_state_kernel(
    x, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state,
    stride_x_t, stride_s_g, stride_s_d, D,
    KW: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
):
    """State columns 0..K-2 <- the last K-1 inputs of the window (old state columns where L < K-1)."""
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    group = tl.load(state_indices + n).to(tl.int64)
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    if (group < 0) | (end <= start):
        return
    has_init = tl.load(has_initial_state + n) != 0
    first_col = tl.load(num_accepted + n).to(tl.int32) - 1 + (KW - 1)
    j = tl.arange(0, BW)
    rel = end - start - (KW - 1) + j
    vals = _window_value(x + start.to(tl.int64) * stride_x_t, conv_states, rel, rel, end - start, group, first_col,
                         has_init, d, dmask, stride_x_t, stride_s_g, stride_s_d)
    tl.debug_barrier()  # every read of the old columns before any write
    tl.store(conv_states + group * stride_s_g + d[None, :] * stride_s_d + j[:, None],
             vals.to(conv_states.dtype.element_ty), mask=(j < KW - 1)[:, None] & dmask[None, :])


@triton.jit
def _conv_update_kernel(
    x, weight, conv_states, state_indices, num_accepted, out,
    stride_x_n, stride_x_t, stride_o_n, stride_o_t, stride_s_g, stride_s_d, D,
    Q: tl.constexpr, KW: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
    SILU: tl.constexpr,
    PDL: tl.constexpr,
):
    """Window = [state columns a-1 .. a+K-3 | the Q inputs]; outputs at window positions K-1..K-2+Q."""
    pdl_enter(PDL)
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    j = tl.arange(0, BQ)
    qmask = j < Q
    group = tl.load(state_indices + n).to(tl.int64)
    o_ptr = out + n * stride_o_n + j[:, None] * stride_o_t + d[None, :]
    if group < 0:
        tl.store(o_ptr, tl.zeros([BQ, BD], dtype=out.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])
        return
    first_col = tl.load(num_accepted + n).to(tl.int32) - 1 + (KW - 1)
    xn = x + n * stride_x_n
    acc = tl.zeros([BQ, BD], dtype=tl.float32)
    for i in tl.static_range(KW):
        val = _window_value(xn, conv_states, j + (i - (KW - 1)), j + (i - (KW - 1)), Q, group, first_col, True,
                            d, dmask, stride_x_t, stride_s_g, stride_s_d)
        w = tl.load(weight + d * KW + i, mask=dmask, other=0.0).to(tl.float32)
        acc += val.to(tl.float32) * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])
    # The state keeps the last W window positions: column c holds relative position c + Q - W.
    c = tl.arange(0, BW)
    vals = _window_value(xn, conv_states, c + (Q - W), c + (Q - W), Q, group, first_col, True,
                         d, dmask, stride_x_t, stride_s_g, stride_s_d)
    tl.debug_barrier()
    tl.store(conv_states + group * stride_s_g + d[None, :] * stride_s_d + c[:, None],
             vals.to(conv_states.dtype.element_ty), mask=(c < W)[:, None] & dmask[None, :])


def _conv_block(D: int) -> int:
    return min(256, max(16, triton.next_power_of_2(D)))


def _causal_conv1d_fwd(x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state, silu):
    T, D = x.shape
    KW = weight.shape[1]
    N = state_indices.shape[0]
    out = _empty_output(x)
    if T == 0 or N == 0:
        return out
    BD = min(_conv_block(D), 64)
    log_n = max(1, math.ceil(math.log2(N + 1)))
    _conv_fwd_kernel[(T // CHUNK + N, triton.cdiv(D, BD))](
        x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state, out,
        x.stride(0), out.stride(0), conv_states.stride(0), conv_states.stride(1), N, D,
        KW=KW, BW=triton.next_power_of_2(max(KW - 1, 1)), BT=CHUNK, BD=BD, LOG_N=log_n, SILU=silu, num_warps=4,
    )
    BDS = _conv_block(D)
    _conv_state_kernel[(N, triton.cdiv(D, BDS))](
        x, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state,
        x.stride(0), conv_states.stride(0), conv_states.stride(1), D,
        KW=KW, BW=triton.next_power_of_2(max(KW - 1, 1)), BD=BDS, num_warps=4,
    )
    return out


def _causal_conv1d_update(x, weight, conv_states, state_indices, num_accepted, silu):
    N, Q, D = x.shape
    KW = weight.shape[1]
    W = conv_states.shape[2]
    out = _empty_output(x)
    if N == 0:
        return out
    BD = _conv_block(D)
    _conv_update_kernel[(N, triton.cdiv(D, BD))](
        x, weight, conv_states, state_indices, num_accepted, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), conv_states.stride(0), conv_states.stride(1), D,
        Q=Q, KW=KW, W=W, BQ=triton.next_power_of_2(Q), BW=triton.next_power_of_2(W), BD=BD, SILU=silu,
        num_warps=4, **pdl_launch(x.device)
    )
    return out


def _check_conv(weight, conv_states, D, min_width):
    _check(weight.dim() == 2 and weight.shape[0] == D, f"weight must be [{D}, K], got {tuple(weight.shape)}")
    KW = weight.shape[1]
    _check(conv_states.dim() == 3 and conv_states.shape[1] == D and conv_states.shape[2] >= max(KW - 1, min_width),
           f"conv_states must be [G, {D}, K-1+k] with K = {KW}, got {tuple(conv_states.shape)}")
    _check(conv_states.stride(2) == 1, "conv_states must be contiguous in its last dim")


def _check_activation(activation):
    _check(activation in (None, "silu"), f"activation must be 'silu' or None, got {activation!r}")
    return activation == "silu"


def causal_conv1d_fn(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D, K]
    cu_seqlens: torch.Tensor,  # [N+1]
    conv_states: torch.Tensor,  # [G, D, K-1+k]
    state_indices: torch.Tensor,  # [N], PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N]
    has_initial_state: torch.Tensor,  # [N] bool
    activation: str | None = "silu",
) -> torch.Tensor:  # [T, D]
    """Prefill over packed sequences; the last K-1 inputs of each are written to columns 0..K-2 of its state."""
    _check(x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}")
    D = x.shape[1]
    _check_conv(weight, conv_states, D, 0)
    N = state_indices.shape[0]
    _check(cu_seqlens.shape == (N + 1,), f"cu_seqlens must be [{N + 1}] for {N} state indices")
    _check(num_accepted.shape == (N,) and has_initial_state.shape == (N,),
           f"num_accepted and has_initial_state must be [{N}]")
    silu = _check_activation(activation)
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    return _causal_conv1d_fwd(x, weight, cu_seqlens, conv_states, state_indices, num_accepted, has_initial_state, silu)


def causal_conv1d_update(
    x: torch.Tensor,  # [N, Q, D] with Q = 1 + k
    weight: torch.Tensor,  # [D, K]
    conv_states: torch.Tensor,  # [G, D, K-1+k]
    state_indices: torch.Tensor,  # [N], PAD (<0) skips the sequence
    num_accepted: torch.Tensor,  # [N]
    activation: str | None = "silu",
) -> torch.Tensor:  # [N, Q, D]
    """Decode / verify: reads the window at column num_accepted-1, stores the last K-1+k inputs."""
    _check(x.dim() == 3, f"x must be [N, Q, D], got {tuple(x.shape)}")
    N, Q, D = x.shape
    _check_conv(weight, conv_states, D, 0)
    _check(conv_states.shape[2] <= weight.shape[1] - 1 + Q,
           f"conv_states width {conv_states.shape[2]} is more than the window of K-1+{Q} = {weight.shape[1] - 1 + Q}")
    _check(state_indices.shape == (N,) and num_accepted.shape == (N,), f"state_indices and num_accepted must be [{N}]")
    silu = _check_activation(activation)
    x = x if x.stride(2) == 1 else x.contiguous()
    weight = weight.contiguous()
    return _causal_conv1d_update(x, weight, conv_states, state_indices, num_accepted, silu)
