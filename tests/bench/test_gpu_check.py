"""`python -m bench.gpu_check` without a GPU falls back to the CPU: router and plain worker processes on the CPU,
every distributed row's greedy tokens identical to in-process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from model.random_checkpoint import write_checkpoint


def test_cpu_fallback_runs_and_tokens_match(tmp_path):
    d = write_checkpoint(tmp_path / "ck", "tiny", seed=6)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--model", str(d), "--workers", "2",
                           "--batch-sizes", "3", "--gen-len", "4"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ast.literal_eval(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [(r["config"], r["batch"]) for r in rows] == [("in-process", 3), ("2 workers", 3)]
    assert all(r["tok_s"] > 0 for r in rows)
    for r in rows[1:]:
        assert r["same_tokens"] is True and r["rpcs_per_step"] > 0 and r["kb_per_step"] > 0
    assert "decode tok/s on cpu, bfloat16" in proc.stdout  # the default dtype, on the CPU device
