"""`--speculative-token-map`: a draft vocabulary for the MTP head (worker.engine.token_map), its file
formats and errors, the tool that writes one, and an engine that drafts only inside it and still gives
k = 0's tokens."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from worker import LLM, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.token_map import load_token_map
from worker.model.layers.embedding import DraftVocabHead, ParallelLMHead
from worker.tools import token_map as tool
from worker.tools.builtin.heldout import HELD_OUT_PROMPTS
from worker.tools.builtin_model import builtin_model_dir

IDS = [7, 3, 11, 0, 5]


@pytest.mark.parametrize("suffix", [".pt", ".pt-list", ".json", ".txt"])
def test_the_file_formats_read_alike(tmp_path, suffix):
    path = tmp_path / f"map{suffix.split('-')[0]}"
    if suffix == ".pt":
        torch.save(torch.tensor(IDS, dtype=torch.int32), path)
    elif suffix == ".pt-list":
        torch.save(IDS, path)
    elif suffix == ".json":
        path.write_text(json.dumps(IDS))
    else:
        path.write_text(" ".join(map(str, IDS)) + "\n")
    ids = load_token_map(path, vocab_size=12)
    assert ids.dtype == torch.int64 and ids.tolist() == IDS


@pytest.mark.parametrize("content,message", [
    ("[1, 2, 2]", "distinct"),
    ("[1, 12]", r"in \[0, 12\)"),
    ("[-1, 3]", r"in \[0, 12\)"),
    ("[[1, 2], [3, 4]]", "1-D"),
    ("[]", "1-D"),
    ("[1.5, 2.0]", "integers"),
    ("not json", "cannot read"),
])
def test_a_bad_map_is_refused_naming_the_flag_and_the_file(tmp_path, content, message):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_token_map(path, vocab_size=12)
    assert "--speculative-token-map" in str(info.value) and str(path) in str(info.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_token_map(tmp_path / "absent.pt", vocab_size=12)


def test_a_map_needs_speculative_tokens():
    with pytest.raises(ValueError, match="speculative_tokens > 0"):
        EngineConfig(model="m", speculative_token_map="map.pt")


def test_the_tool_ranks_by_count_ties_to_the_lower_id_and_keeps_eos():
    counts = {5: 3, 2: 3, 9: 1, 4: 7}
    assert tool.frequent_ids(counts, 3, always=[9]) == [9, 4, 2]
    assert tool.frequent_ids(counts, 10, always=[]) == [4, 2, 5, 9]


def test_the_draft_head_gives_the_lm_head_columns_of_its_ids():
    lm_head = ParallelLMHead(40, 16)
    lm_head.weight.data.copy_(torch.arange(40 * 16, dtype=torch.float32).reshape(40, 16).sin())
    ids = torch.tensor([31, 2, 17, 0])
    hidden = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16).cos()
    torch.testing.assert_close(DraftVocabHead(lm_head, ids)(hidden), lm_head(hidden)[:, ids], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXTSERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return builtin_model_dir()


def test_drafts_stay_in_the_map_and_the_tokens_are_k0s(model_dir, tmp_path):
    """A map of the held-out prompts' own tokens (plus EOS), written by the tool: every draft the head
    makes is one of its ids, and greedy decoding at k = 2 still gives k = 0's tokens."""
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(HELD_OUT_PROMPTS))
    path = tmp_path / "map.json"
    tool.main(["--model", str(model_dir), "--size", "256", "--out", str(path), str(text)])
    allowed = set(json.loads(path.read_text()))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in HELD_OUT_PROMPTS[:3]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLM(model_dir) as llm:
        plain = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(model_dir, speculative_tokens=2, speculative_token_map=str(path)) as llm:
        proposer = llm.engine.worker.runner.proposer
        drafted = []
        draft = proposer.draft
        proposer.draft = lambda *args, **kwargs: drafted.append(draft(*args, **kwargs)) or drafted[-1]
        speculative = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert speculative == plain
    assert drafted and set(torch.cat(drafted).flatten().tolist()) <= allowed
