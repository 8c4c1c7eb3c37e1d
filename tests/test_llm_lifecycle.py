"""The offline LLM starts, stops and restarts like a well-kept library's, and a tensor-parallel start
fails fast: ranks are fresh interpreters (a script without a main guard is never re-run), a rank
that dies during start-up makes rank 0 raise naming it, and no rank outlives its LLM."""

import gc
import os
import subprocess
import sys
import time

import pytest

from tests.processes import alive, rank_pids
from worker import LLM, SamplingParams
from worker.parallel.launch import RankStartupError

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 300, 42]

# A user's script as people write them: no `if __name__ == "__main__":` guard, one LLM dropped
# without shutdown() and the last one left for interpreter exit.
SCRIPT = """
import os, sys
from worker import LLM, SamplingParams

params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
llm = LLM(sys.argv[1], tensor_parallel_size=2, cache_memory_bytes=32 << 20)
first = [p.pid for p in llm.engine.ranks.processes]
print("tokens", llm.generate([[5, 17, 300, 42]], params)[0].token_ids, flush=True)
del llm
print("left after drop", [pid for pid in first if os.path.exists(f"/proc/{pid}")], flush=True)
llm = LLM(sys.argv[1], tensor_parallel_size=2, cache_memory_bytes=32 << 20)
print("ranks", *first, *[p.pid for p in llm.engine.ranks.processes], flush=True)
print("tokens", llm.generate([[5, 17, 300, 42]], params)[0].token_ids, flush=True)
"""


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny-tp")


def make_llm(model_dir, tp: int) -> LLM:
    return LLM(model_dir, tensor_parallel_size=tp, cache_memory_bytes=32 << 20)


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix).strip() for line in text.splitlines() if line.startswith(prefix)]


def test_script_without_main_guard_builds_two_tp2_llms_and_exits_clean(model_dir, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), str(model_dir)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    first, second = lines_starting(result.stdout, "tokens")
    assert first == second and len(first.split(",")) == 8
    assert lines_starting(result.stdout, "left after drop") == ["[]"], "a dropped LLM's ranks kept running"
    pids = [int(pid) for pid in lines_starting(result.stdout, "ranks")[0].split()]
    assert len(pids) == 2 and not [pid for pid in pids if alive(pid)], "a rank outlived the script"
    # Both groups were stopped by us (garbage collection, then interpreter exit), not killed by PDEATHSIG.
    assert result.stderr.count("rank 1 stopping") == 2, result.stderr[-3000:]


@pytest.mark.parametrize("fault, exit_code", [("1:join:kill", -9), ("1:load:exit", 3)], ids=["killed-at-join",
                                                                                             "exits-at-load"])
def test_rank_dying_during_start_up_makes_rank_0_raise_naming_it(model_dir, monkeypatch, fault, exit_code):
    monkeypatch.setenv("NEXTSERVE_TEST_RANK_FAULT", fault)
    started = time.monotonic()
    with pytest.raises(RankStartupError, match="tensor-parallel rank 1 ") as err:
        make_llm(model_dir, 2)
    assert time.monotonic() - started < 30
    assert err.value.rank == 1 and err.value.exit_code == exit_code
    assert f"code {exit_code}" in str(err.value)
    assert any("test fault: rank 1 fails" in line for line in err.value.tail), err.value.tail
    assert rank_pids(os.getpid()) == [], "ranks of the failed start were left behind"

    monkeypatch.delenv("NEXTSERVE_TEST_RANK_FAULT")
    with make_llm(model_dir, 2) as llm:  # the process is fit to start a group again
        assert len(llm.generate([PROMPT], PARAMS)[0].token_ids) == 8


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_with_block_shuts_down_and_a_new_llm_works_after(model_dir, tp):
    with make_llm(model_dir, tp) as llm:
        ranks = rank_pids(os.getpid())
        assert len(ranks) == tp - 1
        tokens = llm.generate([PROMPT], PARAMS)[0].token_ids
    assert rank_pids(os.getpid()) == [] and not [pid for pid in ranks if alive(pid)]
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([PROMPT], PARAMS)

    again = make_llm(model_dir, tp)
    assert again.generate([PROMPT], PARAMS)[0].token_ids == tokens
    again.shutdown()
    again.shutdown()
    assert rank_pids(os.getpid()) == []


def test_garbage_collection_stops_the_ranks(model_dir):
    llm = make_llm(model_dir, 2)
    ranks = rank_pids(os.getpid())
    assert len(ranks) == 1
    del llm
    gc.collect()
    assert rank_pids(os.getpid()) == [] and not alive(ranks[0])
