"""Tile configs of the fused MoE kernels: tuned per (E, H, I, dtype, device) as JSON data, else a default.

A file `configs/E={E},H={H},I={I},dtype={dtype},device={device}.json` maps a token count to
{"BLOCK_M": ..., "gate_up": {...}, "down": {...}}; both GEMMs share BLOCK_M (the pairs are grouped
into blocks of that size once). `"path": "pairs"` (no BLOCK_M) selects the decode kernels instead
(decode.py; with `"pdl"` or `"fused"` for how its two stages are launched). I is the per-rank
intermediate size, so tp 1, 2 and 4 of one model have a file each; dtype=float8_e4m3fn files hold
the FP8 kernels' configs (triton_fp8.get_fp8_config). `benchmarks/tune_moe.py` writes them; the
token count nearest the asked one wins.

A card with no file of its own reads the files of the card its architecture was tuned on, where one is
named in TUNED_SIBLING (an H100 reads the H200's: the same multiprocessors and caches, slower memory).
The dense GEMV (triton_linear) and the FP8 linear (fp8.triton) look up their files the same way.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")


TUNED_SIBLING = {(9, 0): "NVIDIA_H200"}  # compute capability -> the card whose tiles the others borrow


@functools.cache
def config_device_names(device: torch.device) -> tuple[str, ...]:
    """The device names whose tuned files serve this device, in order: its own, then its tuned sibling's."""
    own = device_name(device)
    if device.type != "cuda":
        return (own,)
    sibling = TUNED_SIBLING.get(torch.cuda.get_device_capability(device))
    return (own,) if sibling in (None, own) else (own, sibling)


def tuned_entry_for(device: torch.device, path_for: Callable[[str], Path], num_tokens: int) -> dict | None:
    """tuned_entry of the first existing file among path_for(name) for config_device_names(device)."""
    for name in config_device_names(device):
        entry = tuned_entry(path_for(name), num_tokens)
        if entry is not None:
            return entry
    return None


def config_file_name(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str) -> str:
    return f"E={num_experts},H={hidden},I={inter},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.cache
def read_token_table(path: Path) -> dict[int, dict] | None:
    """A tuned config file (token count -> config, as benchmarks write them); None if there is none."""
    if not path.is_file():
        return None
    return {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}


def tuned_entry(path: Path, num_tokens: int) -> dict | None:
    """The entry of the file at `path` for the token count nearest num_tokens (the smaller on a tie)."""
    table = read_token_table(path)
    if not table:
        return None
    return table[min(table, key=lambda m: (abs(m - num_tokens), m))]


def default_config(num_tokens: int, dtype: torch.dtype) -> dict:
    """A few tokens: the pair-by-pair GEMV path (decode.py). Memory-bound small batches: one 16-row block per expert, narrow N tiles for many programs;
    large batches: tensor-core tiles grouped along M for L2 reuse. fp32 halves K to fit shared memory."""
    if num_tokens <= 4:
        return {"path": "pairs", "gate_up": dict(BLOCK_N=8, BLOCK_K=256, num_warps=4),
                "down": dict(BLOCK_N=8, BLOCK_K=256, num_warps=4)}
    if num_tokens <= 32:
        cfg = {"BLOCK_M": 16, "gate_up": dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
               "down": dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)}
    elif num_tokens <= 512:
        cfg = {"BLOCK_M": 32, "gate_up": dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4),
               "down": dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4)}
    else:
        cfg = {"BLOCK_M": 64, "gate_up": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
               "down": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)}
    if dtype == torch.float32:
        for gemm in ("gate_up", "down"):
            cfg[gemm] = dict(cfg[gemm], BLOCK_K=32, num_stages=min(cfg[gemm]["num_stages"], 3))
    return cfg


@functools.lru_cache(maxsize=4096)  # called per MoE layer per step: the lookup stays off the hot path
def get_config(num_tokens: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
               device: torch.device, fallback: bool = True) -> dict | None:
    """The tuned config nearest num_tokens; without a file: default_config, or None without fallback."""
    tuned = tuned_entry_for(
        device, lambda name: CONFIG_DIR / config_file_name(num_experts, hidden, inter, dtype, name), num_tokens)
    if tuned is None:
        return default_config(num_tokens, dtype) if fallback else None
    return tuned
