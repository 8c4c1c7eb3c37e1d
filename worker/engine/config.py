"""Engine settings, one dataclass, validated once at start."""

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    speculative_tokens: int = 0
    speculative_token_map: str | None = None  # a file of the token ids the MTP head may draft (worker.engine.token_map)
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the card for weights, activations and caches
    cache_memory_bytes: int = 512 << 20  # CPU: bytes for KV blocks and GDN states together
    num_kv_blocks: int | None = None  # fix the number of KV blocks (tests, debugging)
    ssm_state_dtype: str = "float32"
    kernel_backend: str = "auto"  # "auto" (Triton on CUDA), "torch" (the references), "triton"
    seed: int = 0
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (benchmarks)
    enforce_eager: bool = False  # CUDA: no CUDA graphs (decode steps run the same code eagerly)
    # CUDA: the batch sizes to capture (None: 1, 2, 4, 8, then every 8 up to max_num_seqs); a batch pads up to
    # the next one, and a batch above the largest runs eagerly.
    cuda_graph_sizes: tuple[int, ...] | None = None
    async_scheduling: bool = False  # launch the next decode step before waiting for this one's tokens (tp 1)
    disable_custom_all_reduce: bool = False  # CUDA, tp > 1: NCCL for every all-reduce, no one-shot over peer memory

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.ssm_state_dtype not in DTYPES:
            raise ValueError(f"ssm_state_dtype must be one of {sorted(DTYPES)}, got {self.ssm_state_dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.device.startswith("cuda") and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs as many GPUs; "
                             f"{torch.cuda.device_count()} visible")
        if self.cuda_graph_sizes is not None:
            sizes = tuple(sorted(set(self.cuda_graph_sizes)))
            if not sizes or sizes[0] < 1:
                raise ValueError(f"cuda_graph_sizes must be positive batch sizes, got {self.cuda_graph_sizes!r}")
            self.cuda_graph_sizes = sizes
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be auto, torch or triton, got {self.kernel_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {self.speculative_tokens}")
        if self.speculative_token_map and not self.speculative_tokens:
            raise ValueError("speculative_token_map is a draft vocabulary: it needs speculative_tokens > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_ssm_dtype(self) -> torch.dtype:
        return DTYPES[self.ssm_state_dtype]
