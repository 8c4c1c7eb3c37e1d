"""transformers' Qwen3NextForCausalLM with the MTP head beside it, as the engine runs them.

The head is `worker/model/qwen3_next.py`'s MultiTokenPredictor built from transformers' own layers:
row i reads `fc(cat(pre_fc_norm_embedding(embed(t[i+1])), pre_fc_norm_hidden(h[i])))` at position i,
where h is the target's hidden state after its final norm, runs one full-attention MoE decoder layer,
then `mtp.norm`, and the shared lm_head predicts t[i+2]. The chained draft step of the engine's
proposer is trained too: its row i reads embed(t[i+2]) and the head's own post-norm output m[i] at
position i+1, attends to the first pass's keys at positions 0..i and to itself (what the MTP KV
cache holds when the engine chains), and predicts t[i+3].

transformers is imported lazily here, so a script can call `use_torch_paths()` before anything loads its
Qwen3-Next.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# fla-core's backward refused Triton 3.6 on Hopper once; transformers falls back to its own torch GDN and
# conv code when these do not import, and every machine has those.
KERNEL_PACKAGES = ("fla", "causal_conv1d")


def use_torch_paths() -> None:
    """Make transformers' Qwen3-Next take its torch paths; call before transformers imports it."""
    if "transformers.models.qwen3_next.modeling_qwen3_next" in sys.modules:
        present = [p for p in KERNEL_PACKAGES if sys.modules.get(p) is not None]
        if present:
            raise RuntimeError(f"transformers' Qwen3-Next was imported with {present} available; "
                               f"call use_torch_paths() first")
    for package in KERNEL_PACKAGES:
        sys.modules.setdefault(package, None)  # `import fla` now raises ImportError
    for package in KERNEL_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        raise RuntimeError(f"{package} still imports; transformers would use it")


def hf_modules():
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next


def hf_config(config_json: dict):
    """transformers' config from our config.json dict, with sdpa attention: a transformers attention layer
    whose implementation is unset can run non-causally, and the MTP layer is built outside the model."""
    from transformers import Qwen3NextConfig

    config = Qwen3NextConfig.from_dict(config_json)
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    config.use_cache = False
    return config


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3NextExperts.forward with every expert run on every token and weighted 0 where the
    token did not pick it: the same sums (and gradients) as the sparse loop, without its host sync per expert.
    hidden_states [S, H], top_k_index / top_k_weights [S, k] -> [S, H]."""
    weights = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype,
                          device=hidden_states.device).scatter(1, top_k_index, top_k_weights)  # [S, E]
    gate, up = torch.einsum("sh,eih->esi", hidden_states, self.gate_up_proj).chunk(2, dim=-1)  # [E, S, I] each
    out = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))  # [E, S, H]
    return torch.einsum("esh,se->sh", out, weights.to(out.dtype)).to(hidden_states.dtype)


class MTPHead(nn.Module):
    """The `mtp.*` tensors of the published checkpoints: fc, the two pre-fc norms, layers.0, norm."""

    def __init__(self, config):
        super().__init__()
        m = hf_modules()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        layer_config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 1,
                                                "layer_types": ["full_attention"], "mlp_only_layers": []})
        layer_config._attn_implementation = "sdpa"
        layer_config._experts_implementation = "eager"
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = m.Qwen3NextRMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = m.Qwen3NextRMSNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([m.Qwen3NextDecoderLayer(layer_config, 0)])
        self.norm = m.Qwen3NextRMSNorm(hidden, eps=eps)
        if self.layers[0].self_attn.config._attn_implementation != "sdpa":
            raise RuntimeError("the MTP attention layer must run sdpa with an explicit causal mask")

    def forward(self, next_embeds: torch.Tensor, hidden_states: torch.Tensor, position_embeddings,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """next_embeds, hidden_states [B, L, H]; attention_mask [L, L] bool (True: may attend) -> [B, L, H]."""
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden_states)], dim=-1)
        x = self.layers[0](self.fc(x), position_embeddings=position_embeddings,
                           attention_mask=attention_mask[None, None])
        return self.norm(x)


@dataclass
class Logits:
    """Row i of each: main predicts t[i+1], mtp t[i+2], chain (the second draft step) t[i+3]; [B, T, V]."""
    main: torch.Tensor
    mtp: torch.Tensor
    chain: torch.Tensor | None


class BuiltinModel(nn.Module):
    """`lm` is transformers' Qwen3NextForCausalLM, `mtp` the head; windows of T + 3 tokens go in."""

    def __init__(self, config_json: dict, init_std: float = 0.02, dropout: float = 0.0):
        """dropout: on every token mixer's and MLP's output in training (the stdlib is small; the model sees it
        many times)."""
        super().__init__()
        from transformers import Qwen3NextForCausalLM

        config = hf_config(config_json)
        self.config = config
        self.config_json = config_json
        self.lm = Qwen3NextForCausalLM(config)
        self.mtp = MTPHead(config)
        _init_head(self.mtp, init_std)
        self.router_logits: list[torch.Tensor] = []
        m = hf_modules()
        for module in self.modules():
            if isinstance(module, m.Qwen3NextExperts):
                module.forward = types.MethodType(dense_experts_forward, module)
            if isinstance(module, m.Qwen3NextTopKRouter):
                module.register_forward_hook(lambda _m, _in, out: self.router_logits.append(out[0]))
            if dropout and isinstance(module, m.Qwen3NextDecoderLayer):
                for sublayer in (getattr(module, "linear_attn", None), getattr(module, "self_attn", None), module.mlp):
                    if sublayer is not None:
                        sublayer.register_forward_hook(functools.partial(_dropout_output, p=dropout))

    def forward(self, tokens: torch.Tensor, chain: bool = True) -> Logits:
        """tokens [B, T + 3] -> Logits for the T rows."""
        self.router_logits.clear()
        num_rows = tokens.shape[1] - 3
        inputs = tokens[:, :num_rows]
        hidden = self.lm.model(input_ids=inputs, use_cache=False).last_hidden_state  # after the final norm
        embed = self.lm.model.embed_tokens
        positions = torch.arange(num_rows + 1, device=tokens.device)[None]
        rotary = self.lm.model.rotary_emb(hidden, positions)  # (cos, sin) for positions 0..T
        first_rows = tuple(t[:, :num_rows] for t in rotary)
        causal = torch.ones(num_rows, num_rows, dtype=torch.bool, device=tokens.device).tril()
        next_embeds = embed(tokens[:, 1 : num_rows + 1])
        drafted = self.mtp(next_embeds, hidden, first_rows, causal)
        chained = None
        if chain:
            both = tuple(torch.cat([r, t[:, 1:]], dim=1) for r, t in zip(first_rows, rotary))
            chained = self.mtp(torch.cat([next_embeds, embed(tokens[:, 2 : num_rows + 2])], dim=1),
                               torch.cat([hidden, drafted], dim=1), both, chain_mask(causal))[:, num_rows:]
        head = self.lm.lm_head
        return Logits(head(hidden), head(drafted), None if chained is None else head(chained))


def _dropout_output(module: nn.Module, _inputs, output, p: float):
    if not module.training:
        return None
    if isinstance(output, tuple):  # attention: (output, weights)
        return (F.dropout(output[0], p, training=True), *output[1:])
    return F.dropout(output, p, training=True)


def chain_mask(causal: torch.Tensor) -> torch.Tensor:
    """[2T, 2T] for [first-pass rows; chained rows]: the first pass is causal; chained row i sees first-pass
    rows 0..i and itself, as the engine's chained step sees the MTP KV cache."""
    num_rows = causal.shape[0]
    top = torch.cat([causal, torch.zeros_like(causal)], dim=1)
    bottom = torch.cat([causal, torch.eye(num_rows, dtype=torch.bool, device=causal.device)], dim=1)
    return torch.cat([top, bottom], dim=0)


def _init_head(head: nn.Module, std: float) -> None:
    """transformers' init for the layers it would own: normal(std) weights, zero (i.e. one-centred) norms."""
    m = hf_modules()
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
            elif isinstance(module, m.Qwen3NextExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, m.Qwen3NextTopKRouter):
                module.weight.normal_(0.0, std)
            elif isinstance(module, m.Qwen3NextRMSNorm):
                module.weight.zero_()


def router_aux_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style load balancing, mean over MoE layers: E * sum_e(fraction routed to e * mean prob of e)."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [S, E]
        picked = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(dim=1).float()  # [S, E]
        losses.append(probs.shape[-1] * (picked.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def check_causal(model: BuiltinModel, num_rows: int = 40, at: int = 28, seed: int = 0) -> dict:
    """Change token `at` and require every row that must not read it to stay put (and the others to move):
    main rows < at, MTP rows < at - 1 (they read t[i+1]), chained rows < at - 2. Raises on a leak."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (1, num_rows + 3), generator=torch.Generator().manual_seed(seed)).to(device)
    changed = tokens.clone()
    changed[0, at] = (changed[0, at] + 1) % vocab
    a, b = model(tokens), model(changed)
    model.train(was_training)
    report = {}
    for name, first_reader in (("main", at), ("mtp", at - 1), ("chain", at - 2)):
        diff = (getattr(a, name) - getattr(b, name)).abs().amax(dim=(0, 2))  # [T]
        before, after = diff[:first_reader].max().item(), diff[first_reader:].max().item()
        report[name] = {"max_change_before": before, "max_change_after": after}
        if before > 1e-4 or after < 1e-3:
            raise AssertionError(f"{name} logits are not causal: changing token {at} moved earlier rows by "
                                 f"{before:.3g} and later rows by {after:.3g}")
    return report


@torch.no_grad()
def check_dense_experts(model: BuiltinModel, seed: int = 0) -> float:
    """The dense experts against transformers' own forward, on random tokens; -> max abs difference."""
    m = hf_modules()
    experts = next(mod for mod in model.modules() if isinstance(mod, m.Qwen3NextExperts))
    gen = torch.Generator().manual_seed(seed)
    device = experts.gate_up_proj.device
    x = torch.randn(64, experts.hidden_dim, generator=gen).to(device)
    top_k = model.config.num_experts_per_tok
    index = torch.rand(64, experts.num_experts, generator=gen).topk(top_k, dim=-1).indices.to(device)
    weights = torch.rand(64, top_k, generator=gen).softmax(dim=-1).to(device)
    ours = dense_experts_forward(experts, x, index, weights)
    theirs = type(experts).forward(experts, x, index, weights)
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-5 * max(1.0, theirs.abs().max().item()):
        raise AssertionError(f"dense experts differ from transformers' by {diff:.3g}")
    return diff
