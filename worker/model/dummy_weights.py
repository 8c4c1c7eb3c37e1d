"""Random weights made on the device from the config alone (`load_format="dummy"`), for benchmarks
at full-size shapes with no checkpoint read.

The values keep activations finite and routing spread out: linear weights ~ N(0, 1/fan_in),
zero-centred norm weights near 0 (scale 1), gated norm weights near 1, embeddings ~ N(0, 1), GDN
decay parameters in their published ranges. Every tensor is seeded from its name (and the rank),
so the same model comes out each time on a given device.
"""

import zlib

import torch
from torch import nn

from worker.distributed import get_tp

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


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    rank = get_tp().rank
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device)
        gen.manual_seed((zlib.crc32(name.encode()) + 7919 * rank + seed) % 2**63)
        if param.dtype.is_floating_point and param.dtype.itemsize < 2:
            raise ValueError(f"dummy weights for {param.dtype} ({name}) are not supported")
        _fill(name, param.data, gen)
