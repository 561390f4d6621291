"""`expertmesh serve` end to end: a real subprocess with embedded Ray, 2 expert workers and the OpenAI API."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from model.random_checkpoint import write_checkpoint
from tests.ports import free_port

PROMPTS = [f"Request number {i} asks about experts" for i in range(32)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ck = tmp_path_factory.mktemp("serve") / "ck"
    write_checkpoint(ck, "tiny", seed=3)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["serve", "--model", str(ck), "--workers", "2", "--port", str(port),
            "--prometheus-file-sd", str(ck.parent / "file_sd.json"), "--max-request-bytes", "65536",
            "--max-concurrent-requests", "48", "--queue-timeout", "120"]
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("expertmesh serving" in x for x in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(errors)[-3000:]
        time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    yield proc, url, ck, lines, errors
    if proc.poll() is None:
        proc.kill()


def test_prints_url_and_curl_line(server):
    proc, url, _, lines, _ = server
    assert any(url in x for x in lines) and any(x.startswith("try: curl ") for x in lines)


def test_request_limits_from_the_flags(server):
    _, url, _, _, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 70_000, "max_tokens": 1}, timeout=30)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "temperature": 1e-300},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_concurrent_equals_sequential_equals_generate(server):
    _, url, ck, _, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def complete(p):
        r = client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(complete, PROMPTS))
    alone = [complete(p) for p in PROMPTS[:8]]
    assert together[:8] == alone
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model", str(ck), "--prompt",
                          PROMPTS[0], "--max-tokens", "12", "--ignore-eos", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == together[0]


def test_health_ok(server):
    _, url, _, _, _ = server
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_sigint_drains_in_flight_then_exits_cleanly(server):
    proc, url, _, _, errors = server
    result = {}

    def long_request():
        r = httpx.post(url + "/v1/completions", json={"model": "ck", "prompt": "drain me", "max_tokens": 400,
                                                      "ignore_eos": True}, timeout=120)
        result["r"] = r

    before = httpx.get(url + "/v1/admin/engine", timeout=10).json()["generation_tokens_total"]
    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 60  # SIGINT only once the request is running and has produced a token
    while True:
        state = httpx.get(url + "/v1/admin/engine", timeout=10).json()
        if state["generation_tokens_total"] > before:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.01)
    assert t.is_alive()  # 400 tokens take far longer than one poll: the signal comes mid-request
    proc.send_signal(signal.SIGINT)
    t.join(timeout=150)
    assert result["r"].status_code == 200
    assert result["r"].json()["usage"]["completion_tokens"] == 400
    assert proc.wait(timeout=120) == 0
    assert any("stopped" in x for x in errors)
