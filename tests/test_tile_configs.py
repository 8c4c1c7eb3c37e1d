"""Tuned tile files per card: a card without its own file reads its architecture's tuned sibling's
(an H100 the H200's); its own file, where there is one, comes first; other cards find none."""

import json

import pytest
import torch

from worker.kernels.moe import tile_configs


@pytest.fixture
def card(monkeypatch):
    """-> set(name, capability): what the tile lookup sees as the CUDA card (no GPU needed)."""
    def set_card(name: str, capability: tuple[int, int]):
        monkeypatch.setattr(tile_configs, "device_name", lambda device: name if device.type == "cuda" else device.type)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        tile_configs.config_device_names.cache_clear()

    yield set_card
    tile_configs.config_device_names.cache_clear()


def _write(folder, device: str, entry: dict):
    (folder / f"shape,device={device}.json").write_text(json.dumps({"1": entry}))


def test_a_card_without_files_reads_its_tuned_siblings(tmp_path, card):
    path_for = lambda name: tmp_path / f"shape,device={name}.json"  # noqa: E731
    cuda = torch.device("cuda", 0)
    _write(tmp_path, "NVIDIA_H200", {"BN": 2})
    card("NVIDIA_H100_80GB_HBM3", (9, 0))
    assert tile_configs.config_device_names(cuda) == ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200")
    assert tile_configs.tuned_entry_for(cuda, path_for, 1) == {"BN": 2}
    _write(tmp_path, "NVIDIA_H100_80GB_HBM3", {"BN": 8})
    tile_configs.read_token_table.cache_clear()
    assert tile_configs.tuned_entry_for(cuda, path_for, 1) == {"BN": 8}  # its own file first
    card("NVIDIA_A100-SXM4-80GB", (8, 0))
    assert tile_configs.tuned_entry_for(cuda, path_for, 1) is None  # no sibling named for sm_80
    card("NVIDIA_H200", (9, 0))
    assert tile_configs.config_device_names(cuda) == ("NVIDIA_H200",)
    assert tile_configs.config_device_names(torch.device("cpu")) == ("cpu",)
