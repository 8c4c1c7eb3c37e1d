"""The Gated DeltaNet's decode / verify step after its input projections in one launch, Triton (torch
reference: worker.kernels.gdn_decode).

One program per (key head, sequence) does what three launches did (triton_causal_conv1d's update,
triton_gated_delta_rule's recurrence with the gating, triton_gated_rms_norm), with their arithmetic:
1. the causal conv of the key head's q and k channels and of the v channels of its value heads, rounded
   to the activation dtype as the conv kernel's output is, and the conv state's new window for them;
2. per value head, the delta rule over the 1+k tokens from slot num_accepted-1, each state into its slot;
3. each token's output row of the head through the gated RMS norm (and its e4m3 groups).
A program owns every channel of its key head's conv state: the conv state of q and k is read by all the
value heads of a key head, so a finer grid would race its reads against its writes. The norm wants a
value head's whole row, so each program holds whole [K, V] states. Under PDL the first value head's state
is loaded before the wait for the input projection: no kernel of the chain before this one writes it.

NEXTSERVE_GDN_DECODE picks the form (bench_gdn_decode times each): "one" is the above; "two" runs the conv
kernel first and this kernel per (value head, sequence) on its output (twice the programs, no conv inside);
"three" the three kernels that "one" replaces. "three" stays the default until the others are measured on
a GPU (bench_gdn_decode and profile_decode_step with each form); the three agree in the interpreter.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from worker.kernels import triton_causal_conv1d, triton_gated_delta_rule, triton_gated_rms_norm
from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX, MIN_AMAX, attach_token_groups, quantisable
from worker.kernels.fp8.triton import _quantize_groups
from worker.kernels.gdn_decode import decode_in_steps
from worker.kernels.pdl import pdl_enter, pdl_launch
from worker.kernels.triton_causal_conv1d import _check_conv, _window_value
from worker.kernels.triton_gated_delta_rule import _check, _check_states, _gating


def _empty_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel must fill; tests replace this with a NaN fill."""
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _conv_channels(xn, conv_w, conv_states, group, first_col, valid, d, dmask, stride_x_t, stride_c_g, stride_c_d,
                   Q: tl.constexpr, KW: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr):
    """The conv kernel's outputs for channels d at the Q positions, [BQ, BD] in fp32 after rounding to x's
    dtype (what the recurrence read from the conv kernel's output); zeros for a PAD sequence."""
    j = tl.arange(0, BQ)
    acc = tl.zeros([BQ, BD], dtype=tl.float32)
    for i in tl.static_range(KW):
        rel = j + (i - (KW - 1))
        val = _window_value(xn, conv_states, rel, rel, Q, group, first_col, valid, d, dmask,
                            stride_x_t, stride_c_g, stride_c_d)
        w = tl.load(conv_w + d * KW + i, mask=dmask, other=0.0).to(tl.float32)
        acc += val.to(tl.float32) * w[None, :]
    acc = acc * tl.sigmoid(acc)
    return tl.where(valid, acc.to(xn.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _conv_window(xn, conv_states, group, first_col, valid, d, dmask, stride_x_t, stride_c_g, stride_c_d,
                 Q: tl.constexpr, W: tl.constexpr, BW: tl.constexpr):
    """The last W window positions of channels d, [BW, BD]: the conv state's next columns."""
    c = tl.arange(0, BW)
    return _window_value(xn, conv_states, c + (Q - W), c + (Q - W), Q, group, first_col, valid, d, dmask,
                         stride_x_t, stride_c_g, stride_c_d)


@triton.jit
def _store_window(conv_states, vals, group, valid, d, dmask, stride_c_g, stride_c_d, W: tl.constexpr,
                  BW: tl.constexpr):
    c = tl.arange(0, BW)
    tl.store(conv_states + group * stride_c_g + d[None, :] * stride_c_d + c[:, None],
             vals.to(conv_states.dtype.element_ty), mask=((c < W)[:, None] & dmask[None, :]) & valid)


@triton.jit
def _conv_to_rows(xn, xcn, conv_w, conv_states, group, first_col, valid, d, dmask, stride_x_t, stride_xc_t,
                  stride_c_g, stride_c_d, Q: tl.constexpr, KW: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr,
                  BD: tl.constexpr, BW: tl.constexpr):
    """Channels d: the conv outputs of the Q positions into xc's rows (what the conv kernel writes), then the
    conv state's next window, after every read of the old one (the barrier)."""
    rows = _conv_channels(xn, conv_w, conv_states, group, first_col, valid, d, dmask, stride_x_t, stride_c_g,
                          stride_c_d, Q, KW, BQ, BD)
    nxt = _conv_window(xn, conv_states, group, first_col, valid, d, dmask, stride_x_t, stride_c_g, stride_c_d,
                       Q, W, BW)
    j = tl.arange(0, BQ)
    tl.store(xcn + j[:, None] * stride_xc_t + d[None, :], rows.to(xcn.dtype.element_ty),
             mask=(j < Q)[:, None] & dmask[None, :])
    tl.debug_barrier()
    _store_window(conv_states, nxt, group, valid, d, dmask, stride_c_g, stride_c_d, W, BW)


@triton.jit
def _conv_output(xn, valid, d, dmask, stride_x_t, Q: tl.constexpr, BQ: tl.constexpr):
    """Channels d of the Q rows of the conv kernel's output, [BQ, BD] in fp32; zeros for a PAD sequence."""
    j = tl.arange(0, BQ)
    vals = tl.load(xn + j[:, None] * stride_x_t + d[None, :], mask=(j < Q)[:, None] & dmask[None, :], other=0.0)
    return tl.where(valid, vals.to(tl.float32), 0.0)


@triton.jit
def _row(tile, j, BQ: tl.constexpr):
    """Row j of a [BQ, B] tile."""
    return tl.sum(tl.where((tl.arange(0, BQ) == j)[:, None], tile, 0.0), 0)


@triton.jit
def _gated_norm_row(o, z_row, norm_w, cols_v, vmask, eps, V: tl.constexpr):
    """triton_gated_rms_norm's arithmetic for one row: o rounded to the activation dtype, normed, weighted, gated."""
    xf = o.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / V + eps)
    normed = (xf * rstd).to(o.dtype)
    w = tl.load(norm_w + cols_v, mask=vmask, other=0.0)
    y = (w * normed).to(tl.float32)
    zf = tl.load(z_row + cols_v, mask=vmask, other=0.0).to(tl.float32)
    return y * zf * tl.sigmoid(zf)


@triton.jit
def _gdn_decode_kernel(
    x, xc, z, a, b, conv_w, conv_states, A_log, dt_bias, ssm_states, norm_w, state_indices, num_accepted,
    out, x_q, x_scale,
    scale, eps,
    stride_x_n, stride_x_t, stride_xc_n, stride_xc_t, stride_z_n, stride_z_t, stride_z_h,
    stride_a_n, stride_a_t, stride_b_n, stride_b_t, stride_c_g, stride_c_d, stride_s_g, stride_s_slot, stride_s_h,
    H,
    Q: tl.constexpr, K: tl.constexpr, V: tl.constexpr, RATIO: tl.constexpr, KW: tl.constexpr, W: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, CONV: tl.constexpr, HEADS: tl.constexpr,
    G: tl.constexpr, QUANT: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, PDL: tl.constexpr,
):
    """xc [N, Q, D] holds the conv outputs: with CONV this kernel writes its key head's channels there first
    (one program per (key head, sequence), HEADS = RATIO); else the conv kernel did (one program per (value
    head, sequence), HEADS = 1). Kept in registers from the conv to their use, the conv tiles made ptxas
    spill 3.9 KB a thread at 3 tokens; through xc (L1 and L2) 0.65 KB, none at 1 token."""
    hv_first = tl.program_id(0) * HEADS
    hk = hv_first // RATIO
    n = tl.program_id(1).to(tl.int64)
    HV = H * RATIO
    group = tl.load(state_indices + n).to(tl.int64)
    valid = group >= 0
    first_col = tl.load(num_accepted + n).to(tl.int32) - 1 + (KW - 1)
    slot = tl.load(num_accepted + n).to(tl.int64) - 1
    cols_k = tl.arange(0, BK)
    kmask = cols_k < K
    cols_v = tl.arange(0, BV)
    vmask = cols_v < V
    hmask = (kmask[:, None] & vmask[None, :]) & valid
    s_first = ssm_states + group * stride_s_g + hv_first * stride_s_h + cols_k[:, None] * V + cols_v[None, :]
    # Read before the wait: the step's metadata and the first head's state, which the kernels before this one
    # in the chain do not write (this layer's own launch of an earlier step did, and PDL lets at most one
    # kernel run ahead, so that one has finished).
    h_first = tl.load(s_first + slot * stride_s_slot, mask=hmask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    xn = x + n * stride_x_n
    xcn = xc + n * stride_xc_n
    dq = hk * K + cols_k
    dk = H * K + dq
    if CONV:  # 1. every channel of the key head: conv outputs into xc, the conv state's next window
        _conv_to_rows(xn, xcn, conv_w, conv_states, group, first_col, valid, dq, kmask, stride_x_t, stride_xc_t,
                      stride_c_g, stride_c_d, Q, KW, W, BQ, BK, BW)
        _conv_to_rows(xn, xcn, conv_w, conv_states, group, first_col, valid, dk, kmask, stride_x_t, stride_xc_t,
                      stride_c_g, stride_c_d, Q, KW, W, BQ, BK, BW)
        for r in tl.static_range(RATIO):
            dv = 2 * H * K + (hv_first + r) * V + cols_v
            _conv_to_rows(xn, xcn, conv_w, conv_states, group, first_col, valid, dv, vmask, stride_x_t, stride_xc_t,
                          stride_c_g, stride_c_d, Q, KW, W, BQ, BV, BW)
        tl.debug_barrier()  # the rows written above are read back by other threads of the program
    q_tile = _conv_output(xcn, valid, dq, kmask, stride_xc_t, Q, BQ)
    k_tile = _conv_output(xcn, valid, dk, kmask, stride_xc_t, Q, BQ)

    for r in tl.static_range(HEADS):
        hv = hv_first + r
        s_base = s_first + r * stride_s_h
        if r == 0:
            h = h_first
        else:
            h = tl.load(s_base + slot * stride_s_slot, mask=hmask, other=0.0).to(tl.float32)
        # 2. this value head's recurrence, each state into its slot.
        v_tile = _conv_output(xcn, valid, 2 * H * K + hv * V + cols_v, vmask, stride_xc_t, Q, BQ)
        A = tl.load(A_log + hv).to(tl.float32)
        dt = tl.load(dt_bias + hv).to(tl.float32)
        for j in tl.static_range(Q):
            qj = _row(q_tile, j, BQ)
            kj = _row(k_tile, j, BQ)
            qj = qj * tl.rsqrt(tl.sum(qj * qj, 0) + 1e-6) * scale
            kj = kj * tl.rsqrt(tl.sum(kj * kj, 0) + 1e-6)
            vj = _row(v_tile, j, BQ)
            gj = tl.load(a + n * stride_a_n + j * stride_a_t + hv).to(tl.float32)
            bj = tl.load(b + n * stride_b_n + j * stride_b_t + hv).to(tl.float32)
            gj, bj = _gating(gj, bj, A, dt)
            h = h * tl.exp(gj)
            delta = bj * (vj - tl.sum(h * kj[:, None], 0))
            h = h + kj[:, None] * delta[None, :]
            o = tl.sum(h * qj[:, None], 0).to(out.dtype.element_ty)
            tl.store(s_base + j * stride_s_slot, h.to(ssm_states.dtype.element_ty), mask=hmask)
            # 3. the gated norm of the head's row (and its e4m3 groups).
            t = n * Q + j
            z_row = z + n * stride_z_n + j * stride_z_t + hv * stride_z_h
            gated = _gated_norm_row(o, z_row, norm_w, cols_v, vmask, eps, V).to(out.dtype.element_ty)
            tl.store(out + (t * HV + hv) * V + cols_v, gated, mask=vmask)
            if QUANT:  # BV == V: the row's groups are groups hv * V / G .. of the token's HV * V features
                qv, qs = _quantize_groups(tl.reshape(gated.to(tl.float32), (BV // G, G)), FP8_MAX_, MIN_AMAX_)
                i = tl.arange(0, BV // G)
                first = t * (HV * V // G) + hv * (V // G)
                flat = (first + i)[:, None] * G + tl.arange(0, G)[None, :]
                tl.store(x_q + flat, qv.to(x_q.dtype.element_ty))
                tl.store(x_scale + first + i, qs)


def _num_warps(K: int, V: int) -> int:
    """A whole [K, V] fp32 state in registers: at 128 x 128, ptxas gives 128 registers a thread at 16 warps and
    one token (255 at 8 warps)."""
    return 16 if K * V >= 128 * 128 else 4


FORMS = ("one", "two", "three")
THREE_LAUNCHES = (triton_causal_conv1d.causal_conv1d_update,
                  triton_gated_delta_rule.fused_gating_recurrent_gated_delta_rule, triton_gated_rms_norm.gated_rms_norm)


@functools.cache
def decode_form() -> str:
    """How gdn_decode runs, from NEXTSERVE_GDN_DECODE (read once): "one" launch, "two" (the conv kernel, then
    one per value head for the rest), or "three" (the conv, recurrence and norm kernels: the default)."""
    form = os.environ.get("NEXTSERVE_GDN_DECODE", "three")
    _check(form in FORMS, f"NEXTSERVE_GDN_DECODE must be one of {', '.join(FORMS)}, got {form!r}")
    return form


def gdn_decode(mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states, norm_weight, eps,
               state_indices, num_accepted, quant_block=None):
    """The reference's op (worker.kernels.gdn_decode), in the form decode_form() names."""
    return gdn_decode_as(decode_form(), mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias, ssm_states,
                         norm_weight, eps, state_indices, num_accepted, quant_block)


def gdn_decode_as(
    form: str,  # one of FORMS
    mixed_qkv: torch.Tensor,  # [N, Q, D] the conv channels [q | k | v]
    z: torch.Tensor,  # [N, Q, HV, V]
    a: torch.Tensor,  # [N, Q, HV]
    b: torch.Tensor,  # [N, Q, HV]
    conv_weight: torch.Tensor,  # [D, KW]
    conv_states: torch.Tensor,  # [G, D, KW-1+k]
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    ssm_states: torch.Tensor,  # [G, 1+k, HV, K, V]
    norm_weight: torch.Tensor,  # [V]
    eps: float,
    state_indices: torch.Tensor,  # [N]
    num_accepted: torch.Tensor,  # [N]
    quant_block: int | None = None,  # also the output's e4m3 groups, where quantisable(V, quant_block)
) -> torch.Tensor:  # [N * Q, HV, V]
    _check(form in FORMS, f"form must be one of {', '.join(FORMS)}, got {form!r}")
    _check(mixed_qkv.dim() == 3, f"mixed_qkv must be [N, Q, D], got {tuple(mixed_qkv.shape)}")
    N, Q, D = mixed_qkv.shape
    _check(ssm_states.dim() == 5, f"ssm_states must be [G, 1+k, HV, K, V], got {tuple(ssm_states.shape)}")
    HV, K, V = ssm_states.shape[2:]
    _check_states(ssm_states, HV, K, V)
    _check(ssm_states.shape[1] >= Q, f"ssm_states has {ssm_states.shape[1]} slots per group, a step of {Q} needs {Q}")
    key_dim = (D - HV * V) // 2
    _check(key_dim > 0 and 2 * key_dim + HV * V == D and key_dim % K == 0,
           f"mixed_qkv's {D} channels are not [q | k | v] of heads of {K} and {HV} value heads of {V}")
    H = key_dim // K
    _check(HV % H == 0, f"{HV} value heads do not share {H} key heads evenly")
    _check(z.shape == (N, Q, HV, V) and z.stride(3) == 1, f"z must be [{N}, {Q}, {HV}, {V}] with unit last stride")
    _check(a.shape == (N, Q, HV) and b.shape == a.shape and a.stride(2) == 1 and b.stride(2) == 1,
           f"a and b must be [{N}, {Q}, {HV}] with unit last stride")
    _check_conv(conv_weight, conv_states, D, 0)
    KW, W = conv_weight.shape[1], conv_states.shape[2]
    _check(W <= KW - 1 + Q, f"conv_states width {W} is more than the window of K-1+{Q} = {KW - 1 + Q}")
    _check(norm_weight.shape == (V,) and A_log.shape == (HV,) and dt_bias.shape == (HV,),
           f"norm_weight must be [{V}], A_log and dt_bias [{HV}]")
    _check(state_indices.shape == (N,) and num_accepted.shape == (N,), f"state_indices and num_accepted must be [{N}]")
    quant = quantisable(V, quant_block)
    if form == "three":  # the conv, recurrence (with gating) and gated norm kernels that "one" replaces
        return decode_in_steps(THREE_LAUNCHES, mixed_qkv, z, a, b, conv_weight, conv_states, A_log, dt_bias,
                               ssm_states, norm_weight, eps, state_indices, num_accepted,
                               quant_block if quant else None)
    x = mixed_qkv if mixed_qkv.stride(2) == 1 else mixed_qkv.contiguous()
    if form == "two":
        xc = triton_causal_conv1d.causal_conv1d_update(x, conv_weight, conv_states, state_indices, num_accepted)
    else:
        xc = torch.empty(N, Q, D, dtype=x.dtype, device=x.device)  # the kernel's own conv outputs
    out = _empty_output(x, (N * Q, HV, V))
    x_q = torch.empty(N * Q, HV * V, dtype=FP8_DTYPE, device=x.device) if quant else out
    x_scale = torch.empty(N * Q, HV * V // quant_block, dtype=torch.float32, device=x.device) if quant else out
    heads = HV // H if form == "one" else 1
    if N:
        _gdn_decode_kernel[(HV // heads, N)](
            x, xc, z, a, b, conv_weight.contiguous(), conv_states, A_log, dt_bias, ssm_states, norm_weight,
            state_indices, num_accepted, out, x_q, x_scale,
            K ** -0.5, eps,
            x.stride(0), x.stride(1), xc.stride(0), xc.stride(1), *z.stride()[:3], *a.stride()[:2], *b.stride()[:2],
            conv_states.stride(0), conv_states.stride(1), *ssm_states.stride()[:3],
            H,
            Q=Q, K=K, V=V, RATIO=HV // H, KW=KW, W=W, BQ=triton.next_power_of_2(Q), BK=triton.next_power_of_2(K),
            BV=triton.next_power_of_2(V), BW=triton.next_power_of_2(W), CONV=form == "one", HEADS=heads,
            G=quant_block if quant else 1, QUANT=quant, FP8_MAX_=FP8_MAX, MIN_AMAX_=MIN_AMAX,
            num_warps=_num_warps(K, V), **pdl_launch(x.device))
    if quant:
        attach_token_groups(out, x_q, x_scale, quant_block)
    return out
