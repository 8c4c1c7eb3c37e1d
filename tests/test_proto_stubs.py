"""The committed stubs match the .proto sources (regenerate with proto/generate.sh)."""

import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).parents[1] / "proto"


def test_committed_stubs_match_the_proto_sources(tmp_path):
    shutil.copytree(PROTO_ROOT / "nextserve", tmp_path / "nextserve", ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "nextserve" / "v1").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--grpc_python_out=.",
                    "--pyi_out=.", *protos], cwd=tmp_path, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (PROTO_ROOT / p).read_bytes()]
    assert not stale, f"stubs out of date, run proto/generate.sh: {stale}"


def test_stubs_import_package_qualified():
    from nextserve.v1 import engine_pb2, generation_pb2_grpc, plan_pb2

    assert generation_pb2_grpc.GenerationStub
    assert plan_pb2.StepPlan.DESCRIPTOR.full_name == "nextserve.v1.StepPlan"
    assert engine_pb2.DESCRIPTOR.services_by_name["Engine"]
