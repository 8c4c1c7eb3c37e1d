"""The MTP head against a reference assembled from transformers' own modules.

Transformers ignores the `mtp.*` weights, so the reference is built here by hand from HF's
`Qwen3NextDecoderLayer` (full attention, MoE), `Qwen3NextRMSNorm` and `Qwen3NextRotaryEmbedding`,
filled with the checkpoint's `mtp.*` tensors, following the MTP definition:

    row i = fc(cat(pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)))   at position i
    -> decoder layer (causal) -> mtp.norm -> lm_head  predicts t_{i+2}

where h_i is HF's target hidden state after the final norm. Both references fail on a routing
near-tie (tests/near_ties.py); the prompt is tie-free on every preset.
"""

import copy

import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextDecoderLayer,
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
)

from tests.helpers import ModelDriver, load_hf, load_ours, max_diff, read_checkpoint
from tests.near_ties import RoutingWatch, assert_no_near_tie
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.model.context import forward_context

ATOL = 1e-4
PROMPT_LEN = 40


class ReferenceMTP(torch.nn.Module):
    """The MTP head from HF modules; `forward(embeds, hidden)` runs rows 0..n-1 at positions 0..n-1."""

    def __init__(self, model_dir):
        super().__init__()
        config = copy.deepcopy(AutoConfig.from_pretrained(model_dir))
        # One full-attention layer with the sparse MoE block, whatever the target's layer 0 is.
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        config.mlp_only_layers = []
        config.decoder_sparse_step = 1
        config._attn_implementation = "eager"
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.layer = Qwen3NextDecoderLayer(config, layer_idx=0)
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(hidden, eps)
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(hidden, eps)
        self.norm = Qwen3NextRMSNorm(hidden, eps)
        self.rotary = Qwen3NextRotaryEmbedding(config)

        weights = {k[len("mtp.") :]: v.float() for k, v in read_checkpoint(model_dir).items() if k.startswith("mtp.")}
        self.fc_weight = weights.pop("fc.weight")
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            getattr(self, name).weight.data.copy_(weights.pop(f"{name}.weight"))
        layer = {k[len("layers.0.") :]: v for k, v in weights.items()}
        assert all(k.startswith("layers.0.") for k in weights), sorted(weights)
        # HF keeps the experts fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
        prefix = "mlp.experts"
        experts = sorted({int(k.split(".")[2]) for k in layer if k.startswith(prefix + ".")})
        layer[f"{prefix}.gate_up_proj"] = torch.stack([
            torch.cat([layer.pop(f"{prefix}.{e}.gate_proj.weight"), layer.pop(f"{prefix}.{e}.up_proj.weight")])
            for e in experts
        ])
        layer[f"{prefix}.down_proj"] = torch.stack([layer.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
        self.layer.load_state_dict(layer, strict=True)
        self.eval()

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """embeds, hidden [n, H] -> post-norm MTP output [n, H]."""
        n = embeds.shape[0]
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x = (x @ self.fc_weight.t())[None]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        y = self.layer(x, position_embeddings=self.rotary(x, positions), attention_mask=causal, position_ids=positions)
        return self.norm(y)[0]


@pytest.fixture(scope="module")
def setup(fp32_checkpoint):
    return load_hf(fp32_checkpoint), load_ours(fp32_checkpoint), ReferenceMTP(fp32_checkpoint)


def run_mtp(driver: ModelDriver, seq, token_ids, start, hidden, step=0):
    """Our MTP over `token_ids` at positions start.., in the MTP layer's own KV cache."""
    input_ids, positions, ctx = build_step_inputs(
        [SequenceSlice(token_ids, start, seq.block_table, seq.group)], driver.block_size, 1, "cpu", with_gdn=False)
    with torch.no_grad(), forward_context(ctx):
        return driver.model.forward_mtp(input_ids, positions, hidden, step=step)


def test_mtp_loaded(setup):
    _, ours, _ = setup
    assert ours.mtp is not None and len(ours.mtp.layers) == 1


def test_mtp_matches_reference_and_chains(setup):
    hf, ours, ref = setup
    vocab = ours.config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad(), RoutingWatch(hf) as watch:
        hf_hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0]  # after the final norm
        embed = hf.model.embed_tokens
    assert_no_near_tie(watch.near_ties(), "HF routing of the prompt")

    driver = ModelDriver(ours)
    seq = driver.new_sequence()
    [logits] = driver.run([driver.prefill(seq, prompt)])
    assert max_diff(driver.last_hidden, hf_hidden) < ATOL, "target hidden states differ from HF's"
    next_token = int(logits[-1].argmax())
    shifted = prompt[1:] + [next_token]  # row i reads t_{i+1}

    # First draft step: rows 0..n-1.
    ours_out = run_mtp(driver, seq, shifted, 0, driver.last_hidden)
    with RoutingWatch(ref) as watch:
        ref_out = ref(embed(torch.tensor(shifted)), hf_hidden)
    assert_no_near_tie(watch.near_ties(), "reference MTP routing")
    diff = max_diff(ours.compute_logits(ours_out), hf.lm_head(ref_out))
    assert diff < ATOL, f"MTP logits: max |ours - reference| = {diff:.3g}"

    # Chained second step: the draft d1 at position n, fed the MTP's own post-norm output of row n-1.
    draft = int(ours.compute_logits(ours_out[-1:]).argmax())
    ours_chained = run_mtp(driver, seq, [draft], PROMPT_LEN, ours_out[-1:], step=1)
    with RoutingWatch(ref) as watch:
        ref_chained = ref(embed(torch.tensor(shifted + [draft])), torch.cat([hf_hidden, ref_out[-1:]]))[-1:]
    assert_no_near_tie(watch.near_ties(), "reference MTP routing, chained step")
    diff = max_diff(ours.compute_logits(ours_chained), hf.lm_head(ref_chained))
    assert diff < ATOL, f"chained MTP step logits: max |ours - reference| = {diff:.3g}"
