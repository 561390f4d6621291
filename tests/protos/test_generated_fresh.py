"""The committed protos/expert_pb2*.py* must be exactly what protoc generates from protos/expert.proto."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["protos/expert_pb2.py", "protos/expert_pb2_grpc.py", "protos/expert_pb2.pyi"]


def test_generated_files_are_fresh(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    script = ROOT / "scripts" / "gen_protos.sh"
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, env=env, timeout=120)
    stale = [f for f in GENERATED if (tmp_path / f).read_bytes() != (ROOT / f).read_bytes()]
    assert not stale, (f"{stale} are stale for protos/expert.proto: "
                       "run scripts/gen_protos.sh and commit the result")
