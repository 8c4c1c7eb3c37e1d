"""Other clients: Node's @grpc/grpc-js, and the `nextserve` command line exactly as the README shows it."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.serving.conftest import free_port, start_router, start_worker

NODE_DIR = Path(__file__).parent / "node"
PROTO_ROOT = Path(__file__).parents[2] / "proto"


@pytest.fixture(scope="module")
def node_client():
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("node and npm are needed for the grpc-js client test (the project's CI machines have them)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                       timeout=300)
    return NODE_DIR / "client.js"


def test_grpc_js_client_streams_a_generation(spawn, model_dir, node_client):
    worker_port, router_port = free_port(), free_port()
    start_worker(spawn, model_dir, worker_port)
    start_router(spawn, model_dir, router_port, [worker_port])
    request = {"text": "Hello from Node", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    result = subprocess.run(["node", str(node_client), f"127.0.0.1:{router_port}", str(PROTO_ROOT), json.dumps(request)],
                            capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1] == {"done": True}
    chunks = lines[:-1]
    assert sum(len(c["token_ids"]) for c in chunks) == 12
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_with_no_arguments_then_generate(tmp_path):
    """The README's quick start: `nextserve serve`, then `nextserve generate "..."` in another shell."""
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(["nextserve", "serve"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        while "nextserve ready" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        children = _children(serve.pid)
        assert len(children) == 2  # the worker and the router
        result = subprocess.run(["nextserve", "generate", "Tell me a story"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "no streamed text"
        assert "generated tokens" in result.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "orphan processes left behind"
