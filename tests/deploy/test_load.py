"""benchmarks/load.py against the built-in model: a plain load run, and one with faults mixed in that
must leave every request accounted for, nothing leaked and both processes healthy."""

import json
import subprocess
import sys
import time

from tests.deploy.conftest import REPO, run_health, scrape, wait_idle

LOAD = [sys.executable, str(REPO / "benchmarks" / "load.py")]


def run_load(*args: str) -> str:
    done = subprocess.run([*LOAD, *args], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_load_run_prints_a_ghz_like_summary(stack):
    # The workload of the CPU ghz config, at CI size.
    text = run_load("--config", "docker/ghz/generate-cpu-smoke.json", "--server", stack.router_address,
                    "-n", "200", "-c", "16", "--max-tokens", "8")
    print(text)
    assert "  Count:        200" in text
    assert "  [OK]                  200 responses" in text
    for line in ("Requests/sec:", "99 % in", "time to first token:", "inter-token latency:",
                 "output tokens:         1600"):
        assert line in text, line
    info = wait_idle(stack.router_address)
    assert f"KV blocks free {info.load.total_kv_blocks}/{info.load.total_kv_blocks}" in text


def test_load_with_cancellations_deadlines_and_bad_requests_leaks_nothing(stack):
    total = 160
    wait_idle(stack.router_address)
    router_before = scrape(stack.router_metrics_port)
    summary = json.loads(run_load("--server", stack.router_address, "-n", str(total), "-c", "16",
                                  "--max-tokens", "12", "--cancel-rate", "0.2", "--deadline-rate", "0.2",
                                  "--deadline-s", "0.3", "--bad-rate", "0.2", "--seed", "7", "--json"))
    print(json.dumps({key: summary[key] for key in ("status_codes", "by_plan", "server_load_after")}, indent=1))

    # Every request ended with one status, and the one its plan allows.
    assert summary["count"] == sum(summary["status_codes"].values()) == total
    plans = summary["by_plan"]
    assert set(plans) == {"ok", "cancel", "deadline", "bad"}
    assert set(plans["ok"]) == {"OK"}
    assert set(plans["bad"]) == {"INVALID_ARGUMENT"}
    assert set(plans["cancel"]) == {"CANCELLED"}
    assert set(plans["deadline"]) <= {"DEADLINE_EXCEEDED", "OK"} and "DEADLINE_EXCEEDED" in plans["deadline"]

    # The router counted the same requests, except those cancelled or past their deadline before it
    # began to handle them, and may see a deadline as a cancellation a moment early.
    load = wait_idle(stack.router_address).load
    counted = _router_counts(stack, router_before, total)
    codes = summary["status_codes"]
    assert counted["INVALID_ARGUMENT"] == codes["INVALID_ARGUMENT"]
    assert counted["OK"] >= plans["ok"]["OK"]
    assert 0 <= total - sum(counted.values()) <= codes["CANCELLED"] + codes["DEADLINE_EXCEEDED"], counted

    # No KV block or GDN slot group leaked, as GetModelInfo tells (load.py read it too).
    assert load.free_kv_blocks == load.total_kv_blocks and load.free_gdn_slot_groups == load.total_gdn_slot_groups
    assert load.running_requests == load.waiting_requests == 0
    assert summary["server_load_after"]["free_kv_blocks"] == load.total_kv_blocks

    # Both processes are still up and healthy.
    for process, address in ((stack.worker, stack.worker_address), (stack.router, stack.router_address)):
        assert process.proc.poll() is None
        assert run_health(address).returncode == 0


def _router_counts(stack, before: dict, total: int, timeout: float = 1.0) -> dict[str, float]:
    """Generate requests the router finished since `before`, by status; waits a moment for streams
    that gRPC closed while they waited to send (their accounting runs when the stream is collected)."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(stack.router_metrics_port)
        counted = {code: after.get(_key(code), 0) - before.get(_key(code), 0)
                   for code in ("OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED")}
        if sum(counted.values()) >= total or time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


def _key(code: str) -> tuple:
    return ("nextserve_router_requests_total", (("code", code), ("method", "Generate")))
