"""Our Qwen3-Next against transformers' own implementation, in fp32 on perturbed random checkpoints.

Every case drives our model through its paged KV cache and GDN state slots (whole prompts,
chunked prefill, packed batches, decode, mixed steps, speculative verify with partial acceptance)
and compares the logits of every fed token with HF run on the same token prefix from scratch.
HF is causal, so one HF forward over a sequence's final tokens gives the reference for all of its
positions at once. Every HF forward fails on a routing near-tie (tests/near_ties.py): the prompts'
seeds were chosen so none occurs on any preset.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import ModelDriver, hf_logits, load_hf, load_ours, max_diff
from tests.near_ties import assert_no_near_tie, greedy_near_ties

ATOL = 1e-4  # max abs difference of logits (their std is ~3)


@pytest.fixture(scope="module")
def models(fp32_checkpoint):
    """(hf, ours, name) for each preset checkpoint."""
    return load_hf(fp32_checkpoint), load_ours(fp32_checkpoint), fp32_checkpoint.name


def random_tokens(model, count: int, seed: int) -> list[int]:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(logits_row: torch.Tensor) -> int:
    return int(logits_row.argmax())


def assert_matches_hf(hf, tokens: list[int], ours: torch.Tensor, first_position: int = 0, what: str = ""):
    """`ours` holds logits for positions first_position.. of `tokens`; compare with HF's."""
    ref = hf_logits(hf, tokens)[first_position : first_position + ours.shape[0]]
    diff = max_diff(ours, ref)
    assert diff < ATOL, f"{what}: max |ours - hf| = {diff:.3g} over positions {first_position}..{first_position + ours.shape[0] - 1}"


def test_whole_prompt(models):
    hf, ours, _ = models
    prompt = random_tokens(ours, 50, seed=1)
    driver = ModelDriver(ours)
    [logits] = driver.run([driver.prefill(driver.new_sequence(), prompt)])
    assert_matches_hf(hf, prompt, logits, what="50-token prompt")


def test_prefill_then_decode(models):
    """Prefill 20 tokens, then 32 greedy single-token decode steps through our caches."""
    hf, ours, _ = models
    tokens = random_tokens(ours, 20, seed=2)
    driver = ModelDriver(ours)
    seq = driver.new_sequence()
    rows = driver.run([driver.prefill(seq, tokens)])
    for _ in range(32):
        tokens.append(greedy(rows[-1][-1]))
        rows += driver.run([driver.decode(seq, [tokens[-1]])])
    assert_matches_hf(hf, tokens, torch.cat(rows), what="prefill + 32 decodes")


@pytest.mark.parametrize("chunks", [[17, 16, 17], [1, 1, 48], [16, 16, 16, 2], [49, 1]],
                         ids=lambda c: "+".join(map(str, c)))
def test_chunked_prefill(models, chunks):
    """A 50-token prompt prefilled in chunks (KV and GDN state carried) equals HF on the whole prompt."""
    hf, ours, _ = models
    prompt = random_tokens(ours, sum(chunks), seed=3)
    driver = ModelDriver(ours)
    seq = driver.new_sequence()
    rows, start = [], 0
    for size in chunks:
        rows += driver.run([driver.prefill(seq, prompt[start : start + size])])
        start += size
    assert_matches_hf(hf, prompt, torch.cat(rows), what=f"chunks {chunks}")


def test_packed_prefill_then_batched_decode(models):
    """Sequences of lengths 1, 7, 33 and 64 in one step, then three decode steps of all four together."""
    hf, ours, _ = models
    lengths = [1, 7, 33, 64]
    tokens = [random_tokens(ours, n, seed=10 + i) for i, n in enumerate(lengths)]
    driver = ModelDriver(ours)
    seqs = [driver.new_sequence() for _ in lengths]
    rows = [[r] for r in driver.run([driver.prefill(s, t) for s, t in zip(seqs, tokens)])]
    for _ in range(3):
        for i in range(len(seqs)):
            tokens[i].append(greedy(rows[i][-1][-1]))
        step = driver.run([driver.decode(s, [t[-1]]) for s, t in zip(seqs, tokens)])
        for i, r in enumerate(step):
            rows[i].append(r)
    for i, n in enumerate(lengths):
        assert_matches_hf(hf, tokens[i], torch.cat(rows[i]), what=f"sequence of length {n} in a packed batch")


def test_mixed_decode_and_prefill_steps(models):
    """Steps where some sequences decode (first) while others prefill whole prompts or chunks."""
    hf, ours, _ = models
    driver = ModelDriver(ours)
    names = ["a", "b", "c", "d"]
    prompts = {"a": 10, "b": 25, "c": 13, "d": 40}
    tokens = {n: random_tokens(ours, prompts[n], seed=20 + i) for i, n in enumerate(names)}
    seqs = {n: driver.new_sequence() for n in names}
    rows = {n: [] for n in names}
    fed = {n: 0 for n in names}  # prompt tokens prefilled so far

    def step(decoding: list[str], prefilling: dict[str, int]):
        slices = []
        for n in decoding:
            tokens[n].append(greedy(rows[n][-1][-1]))
            slices.append(driver.decode(seqs[n], [tokens[n][-1]]))
        for n, count in prefilling.items():
            slices.append(driver.prefill(seqs[n], tokens[n][fed[n] : fed[n] + count]))
            fed[n] += count
        for n, r in zip(decoding + list(prefilling), driver.run(slices)):
            rows[n].append(r)

    step([], {"a": 10, "b": 25})
    step(["a", "b"], {"c": 13, "d": 20})
    step(["a", "b", "c"], {"d": 20})
    step(["a", "b", "c", "d"], {})
    step(["b", "d"], {})
    for n in names:
        assert_matches_hf(hf, tokens[n], torch.cat(rows[n]), what=f"sequence {n}")


# Per verify round, how many drafts each sequence gets right (the first wrong draft is rejected
# and everything after it with it). Every count 0..k shows up, for every sequence, in varying orders.
ACCEPT_SCRIPTS = {
    2: [[2, 0, 1, 2, 0], [0, 1, 2, 0, 2], [1, 2, 0, 1, 1]],
    3: [[3, 0, 2, 1, 3], [1, 3, 0, 2, 0], [0, 2, 3, 3, 1]],
}
# Not 32 for the third prompt: its 30 tokens route their last position on a near-tie on tiny-tp (layer 3).
PROMPT_SEEDS = [30, 31, 33]


@pytest.mark.parametrize("k", [2, 3], ids=lambda k: f"k{k}")
def test_speculative_verify_with_partial_acceptance(models, k):
    """Verify steps of [last, d1..dk] where the first `m` drafts are HF's greedy continuation and
    d_{m+1} is wrong. Every verify row must equal HF on its prefix, and the next step, which starts
    from GDN slot num_accepted - 1 with the matching conv window, must equal HF on the accepted prefix.
    A fourth sequence prefills in chunks during the first verify steps (decode slices first)."""
    hf, ours, _ = models
    vocab = ours.config.vocab_size
    driver = ModelDriver(ours, num_spec_tokens=k)
    scripts = ACCEPT_SCRIPTS[k]
    seqs = [driver.new_sequence() for _ in scripts]
    # tokens[i]: the accepted tokens; the last one is the bonus token not yet in the caches.
    tokens = [random_tokens(ours, 12 + 9 * i, seed) for i, seed in enumerate(PROMPT_SEEDS)]
    prefill_rows = driver.run([driver.prefill(s, t) for s, t in zip(seqs, tokens)])
    for i, r in enumerate(prefill_rows):
        assert_matches_hf(hf, tokens[i], r, what=f"sequence {i} prompt")
        tokens[i].append(greedy(r[-1]))
    late = driver.new_sequence()
    late_prompt = random_tokens(ours, 30, seed=39)
    late_chunks = [late_prompt[:14], late_prompt[14:]]
    late_rows = []

    for round_ in range(len(scripts[0])):
        drafts = []
        for i, script in enumerate(scripts):
            right = script[round_]
            continuation = hf_greedy(hf, tokens[i], k)
            wrong = (continuation[right] + 1 + round_) % vocab if right < k else None
            d = continuation[:right] + ([wrong] if wrong is not None else [])
            d += [(t + 7) % vocab for t in continuation[len(d) :]]  # after a wrong draft: anything
            drafts.append(d)
        slices = [driver.decode(s, [t[-1]] + d) for s, t, d in zip(seqs, tokens, drafts)]
        if round_ < len(late_chunks):
            slices.append(driver.prefill(late, late_chunks[round_]))
        out = driver.run(slices)
        if round_ < len(late_chunks):
            late_rows.append(out[-1])
        for i, script in enumerate(scripts):
            rows, d = out[i], drafts[i]
            where = f"sequence {i}, verify round {round_} (num_accepted was {slices[i].num_accepted})"
            assert_matches_hf(hf, tokens[i] + d, rows, first_position=len(tokens[i]) - 1, what=where)
            accepted = 0
            while accepted < k and d[accepted] == greedy(rows[accepted]):
                accepted += 1
            assert accepted == script[round_], f"{where}: drafts built to accept {script[round_]}, got {accepted}"
            seqs[i].reject(k - accepted)
            tokens[i] += d[:accepted] + [greedy(rows[accepted])]
    assert_matches_hf(hf, late_prompt, torch.cat(late_rows), what="sequence prefilled beside verify steps")


@torch.no_grad()
def hf_greedy(hf, tokens: list[int], count: int) -> list[int]:
    """HF's greedy continuation of `tokens` (recomputed from scratch per token). The drafts built from
    it must be accepted or rejected by our argmax exactly as scripted, so no pick may be a near-tie."""
    out = list(tokens)
    for _ in range(count):
        row = hf_logits(hf, out)[-1:]
        assert_no_near_tie(greedy_near_ties(row), f"HF's greedy pick after {len(out)} tokens")
        out.append(greedy(row[0]))
    return out[len(tokens) :]


def test_qwen3_5_text_chunked_prefill_and_decode(qwen3_5_checkpoint):
    """Qwen3.5 text checkpoints (in_proj_qkv / in_proj_z / in_proj_b / in_proj_a), written by HF."""
    hf, ours = load_hf(qwen3_5_checkpoint), load_ours(qwen3_5_checkpoint)
    assert ours.config.split_gdn_projections
    tokens = random_tokens(ours, 40, seed=40)
    driver = ModelDriver(ours)
    seq = driver.new_sequence()
    rows = driver.run([driver.prefill(seq, tokens[:17])]) + driver.run([driver.prefill(seq, tokens[17:])])
    for _ in range(8):
        tokens.append(greedy(rows[-1][-1]))
        rows += driver.run([driver.decode(seq, [tokens[-1]])])
    assert_matches_hf(hf, tokens, torch.cat(rows), what="Qwen3.5 prefill 17+23 then 8 decodes")


def test_tied_word_embeddings(checkpoint_factory, tmp_path):
    """tie_word_embeddings: no lm_head.weight in the checkpoint; both models reuse embed_tokens."""
    model_dir = Path(shutil.copytree(checkpoint_factory("tiny", dtype="float32"), tmp_path / "tied"))
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = model_dir / index["weight_map"].pop("lm_head.weight")
    save_file({k: v for k, v in load_file(shard).items() if k != "lm_head.weight"}, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))

    hf, ours = load_hf(model_dir), load_ours(model_dir)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    prompt = random_tokens(ours, 30, seed=50)
    driver = ModelDriver(ours)
    [logits] = driver.run([driver.prefill(driver.new_sequence(), prompt)])
    assert_matches_hf(hf, prompt, logits, what="tied embeddings")
