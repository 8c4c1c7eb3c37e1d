"""Check that every layer can hold its tensor-parallel shard before any rank starts.

The layers themselves refuse shards they cannot hold: a size the tp does not divide, or a shard
that would split an FP8 checkpoint's 128 x 128 weight blocks (SGLang issue 10852: the Qwen3-Next
shared expert, 512 wide, at tp 8). Building one rank's model on the meta device runs those very
checks in a second and in no memory, so a bad tp fails in the parent with the layer's own message.
"""

import torch

from worker.config import ConfigError, ModelConfig
from worker.distributed import tensor_parallel_as
from worker.model.qwen3_next import Qwen3NextForCausalLM


def check_model_shards(config: ModelConfig, tp_size: int) -> None:
    try:
        with tensor_parallel_as(0, tp_size), torch.device("meta"):
            Qwen3NextForCausalLM(config, num_mtp_layers=config.num_mtp_layers or 1)
    except ValueError as e:
        raise ConfigError(str(e)) from e
