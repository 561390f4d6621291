"""`expertmesh loadtest --kill-worker-every S --ray-address ...` against a real `expertmesh serve` (tiny model, two
expert workers): workers are killed through Ray while requests run, the report counts the kills, none fail."""

import json
import os
import subprocess
import sys
import threading
import time

from model.random_checkpoint import write_checkpoint
from tests.processes import stop
from tests.workers.test_security import free_port


def test_loadtest_kills_workers_of_a_served_model_and_nothing_fails(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, "tiny", seed=4)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EXPERTMESH_API_KEY"}
    serve = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", str(ck), "--workers", "2",
                              "--port", str(port), "--prometheus-file-sd", str(tmp_path / "sd.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**env, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(serve.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not (ray_lines := [x for x in out if x.startswith("ray: ")]):
            assert serve.poll() is None and time.monotonic() < deadline, "".join(out)[-3000:]
            time.sleep(0.2)
        ray_address = ray_lines[0].split()[1]
        result = tmp_path / "r.json"
        # 20 requests at 2/s (seeded arrivals over 11.5 s), a worker killed every 8 s: a kill lands while requests
        # run and a replacement (slow on a loaded machine) is done before the next; serve's Ray wants its token
        lt = subprocess.run([sys.executable, "-m", "cluster.cli", "loadtest", "--no-progress",
                             "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", str(ck),
                             "--num-prompts", "20", "--request-rate", "2", "--input-len", "8", "--output-len", "16",
                             "--kill-worker-every", "8", "--ray-address", ray_address, "--result-file", str(result)],
                            capture_output=True, text=True, timeout=300, env={**env, "RAY_AUTH_MODE": "token"})
        assert lt.returncode == 0, lt.stdout[-3000:] + lt.stderr[-3000:]
        r = json.loads(result.read_text())
        kills = r["fault_injection"]["kills"]
        assert (r["completed"], r["failed"], r["failure_reasons"]) == (20, 0, {})
        assert kills >= 1 and len(set(r["fault_injection"]["killed"])) == kills, r["fault_injection"]
        assert f"Expert workers killed: {kills} (one every 8 s)" in lt.stdout
    finally:
        stop(serve)
    replaced = [x for x in out if "expert plane repaired" in x]
    assert len(replaced) >= kills, "".join(out)[-3000:]  # serve's controller: one line per recovery
