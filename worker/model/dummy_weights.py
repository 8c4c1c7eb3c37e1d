"""Random weights made on the device from the config alone (`load_format="dummy"`), for benchmarks
at full-size shapes with no checkpoint read.

The values keep activations finite and routing spread out: linear weights ~ N(0, 1/fan_in),
zero-centred norm weights near 0 (scale 1), gated norm weights near 1, embeddings ~ N(0, 1), GDN
decay parameters in their published ranges. Every tensor is seeded from its name (and the rank),
so the same model comes out each time on a given device.

FP8 weights (an FP8 config.json) get the same spread as q * scale: values ~ N(0, FP8_SPREAD^2)
rounded to e4m3 (well inside its +-448), and block scales around fan_in^-1/2 / FP8_SPREAD, each
block's drawn in [0.75, 1.25] of that so that a kernel mixing up blocks changes the output.
"""

import zlib

import torch
from torch import nn

from worker.distributed import get_tp
from worker.kernels.fp8.quant import FP8_DTYPE, FP8_MAX
from worker.model.layers.fp8 import is_block_scale

NORM_SUFFIXES = ("layernorm.weight", "norm.weight", "q_norm.weight", "k_norm.weight",
                 "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")


def _fill(name: str, param: torch.Tensor, gen: torch.Generator) -> None:
    def normal(std: float, mean: float = 0.0):
        param.normal_(mean, std, generator=gen)

    if name.endswith("linear_attn.norm.weight"):  # plain (not zero-centred) gated RMSNorm weight
        normal(0.02, 1.0)
    elif name.endswith(NORM_SUFFIXES):
        normal(0.02)
    elif name.endswith("A_log"):
        param.uniform_(0.0, 2.7, generator=gen)  # A in [1, 15]: decays exp(-A softplus(.)) as in released models
    elif name.endswith("dt_bias"):
        normal(0.1)
    elif name.endswith("embed_tokens.weight"):
        normal(1.0)
    elif name.endswith("conv1d.weight"):
        normal(param.shape[-1] ** -0.5)
    else:  # linear layers and stacked experts: [..., out, in]
        normal(param.shape[-1] ** -0.5)


FP8_SPREAD = FP8_MAX / 8  # std of the e4m3 values: 8 sigma below the largest finite value
_CHUNK_ELEMENTS = 1 << 26  # float32 staging for FP8 draws, at most 256 MiB at a time


def _fill_fp8(param: torch.Tensor, gen: torch.Generator) -> None:
    rows = param.view(-1, param.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        draw = torch.empty(chunk.shape, dtype=torch.float32, device=param.device)
        chunk.copy_(draw.normal_(0.0, FP8_SPREAD, generator=gen).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))


def _fill_block_scale(param: torch.Tensor, fan_in: int, gen: torch.Generator) -> None:
    param.uniform_(0.75, 1.25, generator=gen).mul_(fan_in**-0.5 / FP8_SPREAD)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    rank = get_tp().rank
    params = dict(model.named_parameters())
    for name, param in params.items():
        gen = torch.Generator(device=param.device)
        gen.manual_seed((zlib.crc32(name.encode()) + 7919 * rank + seed) % 2**63)
        if param.dtype == FP8_DTYPE:
            _fill_fp8(param.data, gen)
        elif is_block_scale(param):
            weight = params[name.replace("_scale_inv", "")]  # x.weight_scale_inv -> x.weight, w13_scale_inv -> w13
            _fill_block_scale(param.data, weight.shape[-1], gen)
        elif param.dtype.is_floating_point and param.dtype.itemsize < 2:
            raise ValueError(f"dummy weights for {param.dtype} ({name}) are not supported")
        else:
            _fill(name, param.data, gen)
