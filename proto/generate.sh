#!/usr/bin/env bash
# Regenerates the Python stubs beside the .proto sources (committed; tests/test_proto_stubs.py checks drift).
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. nextserve/v1/*.proto
