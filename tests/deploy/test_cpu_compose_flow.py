"""docker-compose.cpu.yml's two services as processes, configured only by the file's environment:
the worker writes the built-in model into the shared folder, the router tokenizes from it and serves
both APIs, and the file's healthchecks pass."""

import os
import re
import shutil
import subprocess
import sys
import urllib.request

import grpc
import yaml

from nextserve.v1 import generation_pb2, generation_pb2_grpc
from tests.deploy.conftest import REPO
from tests.serving.conftest import Process, free_port


def _interpolate(value: str) -> str:
    """Compose's ${NAME:-default}, with nothing set on the host."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _environment(service: dict, folders: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """The service's environment for a process here: container folders and ports mapped to ours;
    variables passed through from the host (no value) left unset, as with nothing set on the host."""
    env = {}
    for name, value in service["environment"].items():
        if value is None:
            continue
        value = _interpolate(str(value))
        for inside, outside in folders.items():
            value = value.replace(inside, outside)
        if name.endswith("_HOST"):
            value = "127.0.0.1"
        elif name.endswith("_PORT"):
            value = str(ports[value])
        elif name == "NEXTSERVE_ROUTER_WORKERS":
            value = f"127.0.0.1:{ports[value.rsplit(':', 1)[1]]}"
        env[name] = value
    return env


def _healthcheck(service: dict, ports: dict[str, int]) -> list[str]:
    command = service["healthcheck"]["test"]
    assert command[:3] == ["CMD", "nextserve", "health"]
    server = command[-1].rsplit(":", 1)
    nextserve = [shutil.which("nextserve")] if shutil.which("nextserve") else [sys.executable, "-m", "worker.cli"]
    return [*nextserve, *command[2:-1], f"127.0.0.1:{ports[server[1]]}"]


def test_cpu_compose_services_work_from_their_environment(tmp_path, monkeypatch):
    for name in [name for name in os.environ if name.startswith("NEXTSERVE_")]:
        monkeypatch.delenv(name)  # only the compose file configures the processes
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.cpu.yml").read_text())
    worker_spec, router_spec = compose["services"]["worker"], compose["services"]["router"]
    volume = tmp_path / "builtin-model"  # the named volume
    volume.mkdir()
    folders = {worker_spec["volumes"][0]["target"]: str(volume)}
    ports = {port: free_port() for port in ("50061", "9061", "50051", "8000", "9051")}

    worker = Process(["worker"], tmp_path / "worker.log", _environment(worker_spec, folders, ports))
    router = None
    try:
        worker.wait_serving(f"127.0.0.1:{ports['50061']}")
        assert subprocess.run(_healthcheck(worker_spec, ports), capture_output=True).returncode == 0
        router_env = _environment(router_spec, folders, ports)
        assert os.path.isfile(os.path.join(router_env["NEXTSERVE_ROUTER_MODEL"], "tokenizer.json"))
        router = Process(["router"], tmp_path / "router.log", router_env)
        router.wait_serving(f"127.0.0.1:{ports['50051']}")
        assert subprocess.run(_healthcheck(router_spec, ports), capture_output=True).returncode == 0
        with grpc.insecure_channel(f"127.0.0.1:{ports['50051']}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            chunks = list(stub.Generate(generation_pb2.GenerateRequest(text="Hello", max_tokens=4, ignore_eos=True),
                                        timeout=30))
        assert sum(len(chunk.token_ids) for chunk in chunks) == 4
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['8000']}/health", timeout=10) as health:
            assert health.status == 200
        assert "http_port=" + str(ports["8000"]) in router.output()
        assert "metrics_port=" + str(ports["9061"]) in worker.output()
        assert "metrics_port=" + str(ports["9051"]) in router.output()
    finally:
        if router is not None:
            router.stop()
        worker.stop()
