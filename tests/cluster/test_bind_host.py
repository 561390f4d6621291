"""A --bind-host that is not an address of the node: serve says so in one line (no Ray traceback) and exits."""

import asyncio
import subprocess
import sys
import time

import pytest

from model.random_checkpoint import write_checkpoint
from workers.expert_worker import ExpertWorker
from workers.servicer import BindError, serve_worker

FOREIGN = "10.77.77.77"  # TEST-NET-like private address no interface of this machine has


def test_serve_with_a_foreign_bind_host_fails_in_one_line(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, "tiny", seed=3)
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(ck), "--workers", "1", "--port", "0",
           "--bind-host", FOREIGN, "--prometheus-file-sd", str(tmp_path / "sd.json")]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    errors = [line for line in text.splitlines() if line.startswith("expertmesh serve: error:")]
    assert len(errors) == 1 and f"--bind-host {FOREIGN}:" in errors[0], text
    assert "Cannot assign requested address" in errors[0] and "0.0.0.0" in errors[0]
    assert "Traceback" not in text and 'File "' not in text and "ActorDiedError" not in text, text
    assert "expertmesh serving" not in text
    assert took < 200, took  # Ray's start and stop, not a 300 s readiness timeout


def test_servicer_names_the_address_it_cannot_bind(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, "tiny", seed=3)
    worker = ExpertWorker(str(ck), [(0, 0)], dtype="float32", worker_id="w-bind")
    with pytest.raises(BindError, match=rf"w-bind: cannot bind {FOREIGN}:0"):
        asyncio.run(serve_worker(worker, FOREIGN, 0))
