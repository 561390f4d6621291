#!/usr/bin/env bash
# Regenerate protos/expert_pb2{,_grpc}.py and .pyi from protos/expert.proto (run from anywhere).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (OUT_DIR defaults to the repo root; tests use a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then python=.venv/bin/python; fi
"$python" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/expert.proto
