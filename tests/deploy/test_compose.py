"""The compose files, Dockerfiles and ghz configs: valid for the tools that read them, and saying what
the deployment needs (no Docker engine here, so nothing is built or started)."""

import json
import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from google.protobuf import json_format

from nextserve.v1 import generation_pb2
from tests.deploy.conftest import REPO

DOCKER = REPO / "docker"
GPU_COMPOSE = DOCKER / "docker-compose.yml"
CPU_COMPOSE = DOCKER / "docker-compose.cpu.yml"
HEALTH = ["CMD", "nextserve", "health", "--server"]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package), whichever works here."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [GPU_COMPOSE, CPU_COMPOSE], ids=["gpu", "cpu"])
def test_compose_config_validates(path, tmp_path):
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("neither `docker compose` nor `docker-compose` is installed (.ci/run installs the latter)")
        pytest.skip("no docker compose here (apt-get install docker-compose)")
    env = {**os.environ, "NEXTSERVE_MODEL_DIR": str(tmp_path)}
    done = subprocess.run([*command, "-f", str(path), "config"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == {"router", "worker"}
    if path == GPU_COMPOSE:
        mount = resolved["services"]["worker"]["volumes"][0]
        assert (mount["source"], mount["target"], mount["read_only"]) == (str(tmp_path), "/model", True)


def test_gpu_compose_refuses_to_start_without_a_model_folder():
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose here")
    env = {k: v for k, v in os.environ.items() if k != "NEXTSERVE_MODEL_DIR"}
    done = subprocess.run([*command, "-f", str(GPU_COMPOSE), "config"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode != 0
    assert "NEXTSERVE_MODEL_DIR" in done.stderr


def test_gpu_compose_services():
    services = load(GPU_COMPOSE)["services"]
    assert set(services) == {"router", "worker"}
    worker, router = services["worker"], services["router"]

    assert worker["healthcheck"]["test"] == [*HEALTH, "127.0.0.1:50061"]
    assert router["healthcheck"]["test"] == [*HEALTH, "127.0.0.1:50051"]
    assert router["depends_on"] == {"worker": {"condition": "service_healthy"}}
    assert worker["restart"] == router["restart"] == "unless-stopped"

    for service in (worker, router):
        [mount] = service["volumes"]
        assert mount["type"] == "bind" and mount["read_only"] is True and mount["target"] == "/model"
        assert mount["source"].startswith("${NEXTSERVE_MODEL_DIR")
    assert worker["environment"]["NEXTSERVE_MODEL"] == router["environment"]["NEXTSERVE_ROUTER_MODEL"] == "/model"

    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert worker["environment"]["NEXTSERVE_DEVICE"] == "cuda"

    assert "ports" not in worker, "the Engine service has no authentication: never publish it"
    assert set(worker["expose"]) == {"50061", "9061"}
    assert router["environment"]["NEXTSERVE_ROUTER_WORKERS"] == "worker:50061"
    published = [port.rsplit(":", 1)[-1] for port in router["ports"]]
    assert published == ["50051", "8000", "9051"]
    assert router["environment"]["NEXTSERVE_ROUTER_HTTP_PORT"] == 8000
    assert router["ports"][2].startswith("127.0.0.1:"), "metrics are published on loopback only"


def test_cpu_compose_shares_the_builtin_model_through_a_volume():
    from worker.tools.builtin_model import BUILTIN_MODEL_NAME

    compose = load(CPU_COMPOSE)
    worker, router = compose["services"]["worker"], compose["services"]["router"]
    assert "deploy" not in worker, "no GPU reservation on the CPU"
    assert worker["environment"]["NEXTSERVE_DEVICE"] == "cpu"
    assert "NEXTSERVE_MODEL" not in worker["environment"], "no model: the worker writes the built-in one"
    cache = worker["environment"]["NEXTSERVE_CACHE"]
    [worker_mount], [router_mount] = worker["volumes"], router["volumes"]
    assert worker_mount["type"] == router_mount["type"] == "volume"
    assert worker_mount["source"] == router_mount["source"] in compose["volumes"]
    assert worker_mount["target"] == router_mount["target"] == cache
    assert router_mount["read_only"] is True and not worker_mount.get("read_only")
    assert router["environment"]["NEXTSERVE_ROUTER_MODEL"] == f"{cache}/{BUILTIN_MODEL_NAME}"
    assert router["depends_on"] == {"worker": {"condition": "service_healthy"}}, "the folder exists once healthy"
    assert worker["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert "ports" not in worker
    # Same checks and ports as the GPU file.
    gpu = load(GPU_COMPOSE)["services"]
    for name in ("worker", "router"):
        assert compose["services"][name]["healthcheck"]["test"] == gpu[name]["healthcheck"]["test"]
    assert router["ports"] == gpu["router"]["ports"]


def _env_ports(service: dict) -> set[str]:
    return {str(value) for key, value in service["environment"].items() if key.endswith("PORT") and value}


@pytest.mark.parametrize("path", [GPU_COMPOSE, CPU_COMPOSE], ids=["gpu", "cpu"])
def test_compose_ports_agree_with_the_environment(path):
    services = load(path)["services"]
    assert _env_ports(services["worker"]) == set(services["worker"]["expose"])
    assert _env_ports(services["router"]) == {port.rsplit(":", 1)[-1] for port in services["router"]["ports"]}


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _dependencies() -> dict[str, str]:
    """pyproject's dependencies: name -> the whole requirement string."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~;\[ ]", req, 1)[0].lower(): req for req in project["dependencies"]}


def test_router_image_has_the_routers_dependencies_and_no_torch():
    text = _dockerfile("Dockerfile.router")
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    installed = re.findall(r'"([a-zA-Z0-9_.-]+[<>=][^"]*)"', text)
    requirements = _dependencies()
    for requirement in installed:
        name = re.split(r"[<>=]", requirement, 1)[0].lower()
        assert requirements.get(name) == requirement, f"{requirement} differs from pyproject's {requirements.get(name)}"
    names = {re.split(r"[<>=]", r, 1)[0].lower() for r in installed}
    assert names == set(requirements) - {"torch", "transformers", "safetensors", "numpy", "tqdm"}
    assert "pip install --no-deps /src" in text
    assert re.search(r"^USER nextserve$", text, re.M)
    assert 'ENTRYPOINT ["nextserve", "router"]' in text


def test_worker_image_is_cuda_torch_non_root():
    text = _dockerfile("Dockerfile.worker")
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime-ubuntu", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    spec = re.search(r'^ARG TORCH_SPEC="(.*)"$', text, re.M).group(1)
    assert spec == _dependencies()["torch"]
    assert re.search(r"^USER nextserve$", text, re.M)
    assert 'ENTRYPOINT ["nextserve", "worker"]' in text
    for name in ("worker", "router"):
        assert "--uid 10001" in _dockerfile(f"Dockerfile.{name}"), "one uid, so shared volumes have one owner"
        ignore = _dockerfile(f"Dockerfile.{name}.dockerignore").splitlines()
        kept = ignore[ignore.index("*") + 1:][:5]
        assert kept == ["!pyproject.toml", "!README.md", "!proto/", "!router/", "!worker/"]


GHZ_CONFIGS = sorted((DOCKER / "ghz").glob("*.json"))


def test_ghz_configs_cover_several_concurrencies_and_both_ways_to_find_the_method():
    configs = [json.loads(path.read_text()) for path in GHZ_CONFIGS]
    assert len({config["concurrency"] for config in configs}) >= 4
    assert any("proto" not in config for config in configs), "a config that uses server reflection"
    assert any("proto" in config for config in configs), "a config that reads the .proto file"


@pytest.mark.parametrize("path", GHZ_CONFIGS, ids=[p.stem for p in GHZ_CONFIGS])
def test_ghz_config(path):
    config = json.loads(path.read_text())
    known = {"name", "call", "proto", "import-paths", "host", "insecure", "concurrency", "total", "connections",
             "timeout", "connect-timeout", "data"}
    assert set(config) <= known, set(config) - known
    assert config["call"] == "nextserve.v1.Generation/Generate"
    assert config["insecure"] is True and config["total"] >= config["concurrency"] >= 1
    assert re.fullmatch(r"\d+s", config["timeout"])
    json_format.ParseDict(config["data"], generation_pb2.GenerateRequest())  # every field exists
    if "proto" in config:
        assert config["proto"] == "proto/nextserve/v1/generation.proto"
        assert config["import-paths"] == ["proto"]
        assert (REPO / config["proto"]).is_file()
