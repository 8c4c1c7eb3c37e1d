"""The trained model as a folder in the published Qwen3-Next layout, and the check that it loads.

Tensor names are the ones `worker/tools/tiny_weights.py` lists for the tiny checkpoints (what our
loader and transformers both read): per-expert `experts.{e}.{gate,up,down}_proj.weight` rather
than transformers' stacked `gate_up_proj` / `down_proj`, and `mtp.*` for the head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.tools.tiny_checkpoint import build_generation_config
from worker.tools.tiny_tokenizer import save_tokenizer, write_json
from worker.tools.tiny_weights import tensor_specs

_STACKED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def published_tensors(model) -> dict[str, torch.Tensor]:
    """model: a BuiltinModel -> {published name: tensor}, in the order tensor_specs lists them."""
    tensors = {}
    for prefix, module in (("", model.lm), ("mtp.", model.mtp)):
        for name, tensor in module.state_dict().items():
            tensors.update(_unstack(prefix + name, tensor.detach()))
    specs = tensor_specs(model.config_json, mtp=True)
    expected = {s.name: s.shape for s in specs}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(n for n in expected.keys() & got.keys() if expected[n] != got[n])
        raise AssertionError(f"export differs from the published layout: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
    return {s.name: tensors[s.name] for s in specs}


def _unstack(name: str, tensor: torch.Tensor):
    match = _STACKED.match(name)
    if match is None:
        yield name, tensor
        return
    prefix = match["prefix"]
    for expert in range(tensor.shape[0]):
        if match["kind"] == "down_proj":
            yield f"{prefix}.{expert}.down_proj.weight", tensor[expert]
        else:
            gate, up = tensor[expert].chunk(2, dim=0)  # transformers: gate rows first, then up
            yield f"{prefix}.{expert}.gate_proj.weight", gate
            yield f"{prefix}.{expert}.up_proj.weight", up


def load_folder(model_dir: Path, dropout: float = 0.0):
    """The saved folder back as a float32 BuiltinModel (the inverse of `published_tensors`), in eval mode;
    dropout as BuiltinModel takes it, for training on."""
    from worker.tools.builtin.model import BuiltinModel

    model = BuiltinModel(json.loads((Path(model_dir) / "config.json").read_text()), dropout=dropout)
    tensors = {name: t.float() for name, t in load_file(Path(model_dir) / "model.safetensors").items()}
    for prefix, module in (("", model.lm), ("mtp.", model.mtp)):
        state = {}
        for name in module.state_dict():
            match = _STACKED.match(prefix + name)
            if match is None:
                state[name] = tensors.pop(prefix + name)
                continue
            experts = range(model.config.num_experts)
            base = match["prefix"]
            if match["kind"] == "down_proj":
                state[name] = torch.stack([tensors.pop(f"{base}.{e}.down_proj.weight") for e in experts])
            else:
                state[name] = torch.stack([torch.cat([tensors.pop(f"{base}.{e}.gate_proj.weight"),
                                                      tensors.pop(f"{base}.{e}.up_proj.weight")]) for e in experts])
        module.load_state_dict(state, strict=True)
    if tensors:
        raise ValueError(f"{model_dir}: tensors with no place in the model: {sorted(tensors)[:5]}")
    return model.eval()


@torch.no_grad()
def round_trip_difference(model, model_dir: Path, batch: torch.Tensor) -> float:
    """Max |logit difference| of all three heads between `model` and the saved folder read back."""
    device = next(model.parameters()).device
    reloaded = load_folder(model_dir).to(device)
    model.eval()
    ours, theirs = model(batch.to(device)), reloaded(batch.to(device))
    return max((getattr(ours, h) - getattr(theirs, h)).abs().max().item() for h in ("main", "mtp", "chain"))


def save_folder(out_dir: Path, model, tokenizer, config_json: dict) -> dict:
    """config.json, generation_config.json, tokenizer files and a bf16 model.safetensors -> file sizes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = save_tokenizer(tokenizer, out_dir, config_json)
    write_json(out_dir / "config.json", config_json)
    write_json(out_dir / "generation_config.json", build_generation_config(token_ids))
    tensors = {name: t.to(torch.bfloat16).cpu().contiguous().clone() for name, t in published_tensors(model).items()}
    weights = out_dir / "model.safetensors"
    save_file(tensors, weights, metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors makes files owner-only; a cached model may be read by another user
    return {path.name: path.stat().st_size for path in sorted(out_dir.iterdir()) if path.is_file()}


def round_to_bf16_(model) -> None:
    """What the saved folder holds: every parameter rounded to bfloat16 (then kept in float32)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


@torch.no_grad()
def reload_loss(out_dir: Path, batches: torch.Tensor, batch_size: int, device) -> float:
    """The saved folder through transformers' own from_pretrained (fp32, eager experts): main loss on batches."""
    from transformers import Qwen3NextForCausalLM

    lm = Qwen3NextForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa",
                                              experts_implementation="eager").to(device).eval()
    total, count = 0.0, 0
    num_rows = batches.shape[1] - 3
    for batch in batches.split(batch_size):
        batch = batch.to(device)
        logits = lm(input_ids=batch[:, :num_rows], use_cache=False).logits
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                         batch[:, 1 : num_rows + 1].flatten(), reduction="sum"))
        count += batch.shape[0] * num_rows
    return total / count
