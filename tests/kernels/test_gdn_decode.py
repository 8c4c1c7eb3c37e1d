"""The GDN decode step in one launch (conv, gating, recurrence, gated norm): the Triton kernel against the
torch reference, which runs the four references one after another (outputs NaN-poisoned)."""

import importlib

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import (PAD, LaunchSpy, assert_rel_close, assert_unchanged, generator, randn,
                                   tolerance, verify_batch)

ref = importlib.import_module("worker.kernels.gdn_decode")
tk = pytest.importorskip("worker.kernels.triton_gdn_decode", reason="triton is not installed")

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def nan_decode_outputs(monkeypatch):
    def empty_nan(like, shape=None, dtype=None):
        return torch.full(like.shape if shape is None else shape, float("nan"), dtype=dtype or like.dtype,
                          device=like.device)

    monkeypatch.setattr(tk, "_empty_output", empty_nan)


def decode_inputs(k_spec, nk, nv, dk, dv, kw, dtype, device, seed, extra_rows=0):
    """A batch with every num_accepted in 1..1+k (plus extra_rows random ones) and a PAD row, the projections
    as strided views of one [T, D + HV V] output (as the layer passes them), states with unread slots NaN."""
    q_len = 1 + k_spec
    gen = generator(seed, device)
    accepted, groups, pad_row = verify_batch(k_spec, extra_rows, gen, device)
    rows = len(accepted)
    indices = groups[:pad_row] + [PAD] + groups[pad_row:]
    accepted = accepted[:pad_row] + [1] + accepted[pad_row:]
    n = rows + 1
    conv_dim = 2 * nk * dk + nv * dv
    proj = randn(n * q_len, conv_dim + nv * dv, gen=gen, device=device, dtype=dtype)
    ba = randn(n * q_len, 2 * nv, gen=gen, device=device, dtype=dtype, scale=2.0)
    ssm = randn(rows + 1, q_len, nv, dk, dv, gen=gen, device=device, scale=0.5)
    written = torch.zeros(ssm.shape[:2], dtype=torch.bool)
    for group, a in zip(indices, accepted):
        if group == PAD:
            continue
        read = ssm[group, a - 1].clone()
        ssm[group] = float("nan")  # every slot is written; only slot a-1 is read first
        ssm[group, a - 1] = read
        written[group] = True
    args = dict(
        mixed_qkv=proj[:, :conv_dim].view(n, q_len, conv_dim),
        z=proj[:, conv_dim:].view(n, q_len, nv, dv),
        a=ba[:, :nv].view(n, q_len, nv), b=ba[:, nv:].view(n, q_len, nv),
        conv_weight=randn(conv_dim, kw, gen=gen, device=device, dtype=dtype, scale=0.5),
        conv_states=randn(rows + 1, conv_dim, kw - 1 + k_spec, gen=gen, device=device, dtype=dtype),
        A_log=randn(nv, gen=gen, device=device), dt_bias=randn(nv, gen=gen, device=device),
        ssm_states=ssm,
        norm_weight=(1 + randn(dv, gen=gen, device=device, scale=0.1)).to(dtype), eps=1e-6,
        state_indices=torch.tensor(indices, device=device), num_accepted=torch.tensor(accepted, device=device))
    return args, written.to(device), groups


FORMS = ["one", "two"]


def run_both(args, form="one"):
    """(kernel's output, its states), (reference's output, its states), each on its own copy of the states."""
    mine = dict(args, ssm_states=args["ssm_states"].clone(), conv_states=args["conv_states"].clone())
    theirs = dict(args, ssm_states=args["ssm_states"].clone(), conv_states=args["conv_states"].clone())
    return (tk.gdn_decode_as(form, **mine), mine), (ref.gdn_decode(**theirs), theirs)


def check_decode(k_spec, nk, nv, dk, dv, kw=4, dtype=torch.float32, device="cpu", seed=0, extra_rows=0, form="one"):
    args, written, groups = decode_inputs(k_spec, nk, nv, dk, dv, kw, dtype, device, seed, extra_rows)
    (out, mine), (expected, theirs) = run_both(args, form)
    tol = tolerance(dtype)
    assert_rel_close(out, expected, tol, "output")
    assert_rel_close(mine["ssm_states"][written], theirs["ssm_states"][written], tol, "states after each position")
    assert_unchanged(mine["ssm_states"][~written], args["ssm_states"][~written], "slots the kernel must not write")
    used = torch.tensor(groups, device=device)
    assert_rel_close(mine["conv_states"][used], theirs["conv_states"][used], 1e-6, "conv states")
    unused = torch.ones(args["conv_states"].shape[0], dtype=torch.bool, device=device)
    unused[used] = False
    assert_unchanged(mine["conv_states"][unused], args["conv_states"][unused], "the free group's conv state")
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k_spec", range(4), ids=lambda k: f"k{k}")
@pytest.mark.parametrize("heads", [(2, 4), (2, 2), (1, 3)], ids=lambda h: f"{h[0]}x{h[1]}")
def test_gdn_decode(k_spec, heads, form, device):
    check_decode(k_spec, *heads, dk=16, dv=16, device=device, seed=k_spec, form=form)


@pytest.mark.parametrize("form", FORMS)
def test_gdn_decode_dk_ne_dv_not_powers_of_two(form, device):
    check_decode(2, 2, 4, dk=24, dv=40, kw=3, device=device, seed=5, extra_rows=2, form=form)


def test_the_three_launches_form_is_the_old_path(device):
    check_decode(1, 2, 4, dk=16, dv=16, device=device, seed=6, form="three")


def test_the_form_comes_from_the_environment(monkeypatch):
    for value, expected in ((None, "three"), ("one", "one"), ("two", "two")):
        if value is None:
            monkeypatch.delenv("NEXTSERVE_GDN_DECODE", raising=False)
        else:
            monkeypatch.setenv("NEXTSERVE_GDN_DECODE", value)
        tk.decode_form.cache_clear()
        assert tk.decode_form() == expected
    monkeypatch.setenv("NEXTSERVE_GDN_DECODE", "fused")
    tk.decode_form.cache_clear()
    with pytest.raises(ValueError, match="NEXTSERVE_GDN_DECODE must be one of one, two, three, got 'fused'"):
        tk.decode_form()
    monkeypatch.delenv("NEXTSERVE_GDN_DECODE")
    tk.decode_form.cache_clear()


def test_an_unknown_form_is_refused(device):
    args, _, _ = decode_inputs(0, 2, 4, 16, 16, 4, torch.float32, device, seed=1)
    with pytest.raises(ValueError, match="form must be one of one, two, three"):
        tk.gdn_decode_as("four", **args)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("group", [16, 32])
def test_gdn_decode_writes_the_out_projections_e4m3_groups(group, form, device):
    """With quant_block the output is unchanged and carries the groups the quantisation kernel makes of each
    token's HV * V features (here two groups a head, or one)."""
    from tests.kernels.test_add_rms_norm import assert_groups_of

    args, _, _ = decode_inputs(1, 2, 4, 16, 32, 4, torch.float32, device, seed=7)
    plain = tk.gdn_decode_as(form, **dict(args, ssm_states=args["ssm_states"].clone(),
                                          conv_states=args["conv_states"].clone()))
    quantised = tk.gdn_decode_as(form, **dict(args, ssm_states=args["ssm_states"].clone(),
                                              conv_states=args["conv_states"].clone(), quant_block=group))
    assert torch.equal(quantised, plain)
    assert_groups_of(quantised, group)


def test_pad_rows_are_zero_and_touch_no_state(device):
    args, _, _ = decode_inputs(0, 2, 4, 16, 16, 4, torch.float32, device, seed=3, extra_rows=1)
    out = tk.gdn_decode(**dict(args, ssm_states=args["ssm_states"].clone(), conv_states=args["conv_states"].clone()))
    pad = args["state_indices"].tolist().index(PAD)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))


def test_shape_errors_name_the_argument(device):
    args, _, _ = decode_inputs(0, 2, 4, 16, 16, 4, torch.float32, device, seed=1)
    with pytest.raises(ValueError, match="z must be"):
        tk.gdn_decode(**dict(args, z=args["z"][:, :, :2]))
    with pytest.raises(ValueError, match="mixed_qkv's"):
        tk.gdn_decode(**dict(args, mixed_qkv=args["mixed_qkv"][:, :, 1:]))


# ---------------------------------------------------------------- GPU, Qwen3-Next-80B per-rank shapes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("k_spec", range(4), ids=lambda k: f"k{k}")
def test_gdn_decode_gpu(k_spec, tp, form):
    check_decode(k_spec, 16 // tp, 32 // tp, dk=128, dv=128, dtype=torch.bfloat16, device="cuda", seed=k_spec,
                 extra_rows=40, form=form)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k_spec", [0, 2])
def test_gdn_decode_gpu_matches_the_three_launches(k_spec, form):
    """Against the conv, recurrence and norm kernels run one after another (the path it replaces)."""
    args, written, _ = decode_inputs(k_spec, 16, 32, 128, 128, 4, torch.bfloat16, "cuda", seed=11, extra_rows=8)
    mine = dict(args, ssm_states=args["ssm_states"].clone(), conv_states=args["conv_states"].clone())
    out = tk.gdn_decode_as(form, **mine, quant_block=128)
    ssm, conv = args["ssm_states"].clone(), args["conv_states"].clone()
    expected = tk.gdn_decode_as("three", **dict(args, ssm_states=ssm, conv_states=conv))
    assert torch.equal(mine["conv_states"], conv)
    assert_rel_close(out, expected, 1e-2, "output")
    assert_rel_close(mine["ssm_states"][written], ssm[written], 1e-5, "states")


# ---------------------------------------------------------------- the layer's decode step


def gdn_layer(fp8: bool, device):
    """One Qwen3-Next GDN layer (2 key heads of 16, 4 value heads of 16, packed projections), random weights:
    FP8 blocks of 16 for the projections but in_proj_ba, as the published FP8 layout keeps them."""
    from worker.config import ModelConfig
    from worker.model.gdn import GatedDeltaNet

    raw = dict(model_type="qwen3_next", vocab_size=64, hidden_size=64, num_hidden_layers=1,
               layer_types=["linear_attention"], num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               intermediate_size=128, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
               linear_num_value_heads=4, linear_conv_kernel_dim=4)
    if fp8:
        raw["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                          weight_block_size=[16, 16], modules_to_not_convert=["in_proj_ba"])
    layer = GatedDeltaNet(ModelConfig.from_dict(raw), "model.layers.0.linear_attn")
    gen = generator(21, "cpu")
    for name, param in layer.named_parameters():
        if param.dtype == torch.float8_e4m3fn:
            param.data = (torch.randn(param.shape, generator=gen) * 64).to(param.dtype)
        elif name.endswith("weight_scale_inv"):
            param.data = torch.rand(param.shape, generator=gen) * 0.004 + 0.001
        else:
            param.data = torch.randn(param.shape, generator=gen) * (0.1 if "proj" in name else 0.5)
    layer.after_loading()
    return layer.to(device)


@pytest.mark.parametrize("form", ["one", "two", "three"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-layout", "fp8"])
@pytest.mark.parametrize("k_spec", [0, 2], ids=lambda k: f"k{k}")
def test_layer_decode_step_with_the_kernels_equals_the_references(fp8, k_spec, form, device, monkeypatch):
    """GatedDeltaNet.forward on a decode batch (a PAD row among them): the Triton kernels in each form of
    gdn_decode (NEXTSERVE_GDN_DECODE), the out projection reading its e4m3 groups, against the references."""
    from tests.engine_helpers import gdn_decode_form
    from worker import kernels
    from worker.model.context import GDNMetadata, StepContext, forward_context

    layer = gdn_layer(fp8, device)
    n, q_len = 3, 1 + k_spec
    gen = generator(22, device)
    hidden = randn(n * q_len, 64, gen=gen, device=device)
    conv = randn(4, layer.conv1d.weight.shape[0], 3 + k_spec, gen=gen, device=device)
    ssm = randn(4, q_len, 4, 16, 16, gen=gen, device=device, scale=0.5)
    meta = GDNMetadata(num_decodes=n, decode_query_len=q_len, state_indices=torch.tensor([2, PAD, 0], device=device),
                       num_accepted=torch.tensor([q_len, 1, 1], device=device),
                       has_initial_state=torch.ones(n, dtype=torch.bool, device=device),
                       prefill_cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
    results, spy = {}, LaunchSpy(tk._gdn_decode_kernel)
    monkeypatch.setattr(tk, "_gdn_decode_kernel", spy)
    try:
        with gdn_decode_form(monkeypatch, form):
            for backend in ("torch", "triton"):
                kernels.set_kernel_backend(backend)
                layer.conv_states, layer.ssm_states = conv.clone(), ssm.clone()
                with forward_context(StepContext(None, meta)):
                    out = layer(None, hidden)
                results[backend] = out, layer.conv_states, layer.ssm_states
    finally:
        kernels.set_kernel_backend("auto")
    (out, conv_after, ssm_after), (ref_out, ref_conv, ref_ssm) = results["triton"], results["torch"]
    assert [(grid[1], kwargs["Q"]) for grid, kwargs in spy.launches] == ([] if form == "three" else [(n, q_len)])
    # FP8: the out projection quantises outputs that differ from the reference's in the last bits (2e-7 here),
    # so a value on an e4m3 rounding boundary may round the other way: one step (1/8) of one element moves
    # the output by well under 2e-2.
    assert_rel_close(out, ref_out, 2e-2 if fp8 else 1e-4, "layer output")
    assert_rel_close(conv_after[[0, 2]], ref_conv[[0, 2]], 1e-6, "conv states")
    assert_rel_close(ssm_after[[0, 2]], ref_ssm[[0, 2]], 1e-4, "recurrent states")
