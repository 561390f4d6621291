"""Every `expertmesh serve` flag (and `generate --dtype/--placement`) through the real CLI, each effect asserted on
its own. Starting `serve` is slow, so one serve process carries several flags whose effects are independent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from model.generation import generate
from model.mixtral import KVCache, Mixtral
from model.random_checkpoint import write_checkpoint
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from tests.cluster.test_serve import free_port
from tests.processes import stop
from tests.scrape import by, names, scrape, total

MiB = 1024 * 1024
CANDIDATE_PROMPTS = [[1, 328, 298, 26, 43, 496, 137], [1, 428, 305, 486, 377, 470, 31], [1, 213, 309, 232, 323, 255, 3]]


def cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class Serve:
    """`expertmesh serve ARGS` in a subprocess; waits for its banner; SIGINT and wait on close."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def wait_serving(self, timeout: float = 240) -> Serve:
        deadline = time.monotonic() + timeout
        while not any("expertmesh serving" in x for x in self.out):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.err)[-3000:]
            time.sleep(0.1)
        return self

    def close(self) -> None:
        stop(self.proc, signal.SIGINT)


def admin(url: str) -> dict:
    return httpx.get(url + "/v1/admin/engine", timeout=30).json()


def greedy_ids(model: Mixtral, prompt: list[int], n: int = 12) -> list[int]:
    return generate(model, [prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0][0]


def worker_metrics(file_sd: Path) -> dict[str, list]:
    groups = json.loads(file_sd.read_text())
    return {g["labels"]["worker"]: scrape(f"http://{g['targets'][0]}/metrics") for g in groups
            if g["labels"]["job"] == "expertmesh-worker"}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("flags") / "ck", "tiny", seed=3)


@pytest.fixture(scope="module")
def bf16_prompt(ck):
    """A prompt whose greedy continuation differs between bf16 and fp32 weights, with the bf16 one."""
    fp32, bf16 = Mixtral.from_pretrained(ck), Mixtral.from_pretrained(ck, dtype="bfloat16")
    for p in CANDIDATE_PROMPTS:
        a, b = greedy_ids(fp32, p), greedy_ids(bf16, p)
        if a != b:
            return SimpleNamespace(prompt=p, bf16=b, fp32=a)
    pytest.fail("no candidate prompt tells bf16 from fp32 weights")


FLAGGED = ("--workers", "2", "--served-model-name", "flagged", "--max-model-len", "256", "--no-expert-metrics",
           "--pg-strategy", "SPREAD", "--max-num-batched-tokens", "32", "--kv-cache-mb", "3", "--dtype", "bfloat16",
           "--overlap", "on")


@pytest.fixture(scope="module")
def launched(ck, tmp_path_factory):
    """The serve processes of this module, started together so that their (slow) start-ups overlap: one with
    many non-default flags whose effects do not interfere; one with the default --model, --kv-cache-mb and dtype,
    round-robin placement over 3 workers and the queue bounds (its 512-token context makes long streams); and
    one with a placement-group strategy this one-node cluster cannot satisfy."""
    d = tmp_path_factory.mktemp("flags_run")
    procs = SimpleNamespace(
        flagged=Serve("--model", str(ck), *FLAGGED, "--prometheus-file-sd", str(d / "flagged_sd.json")),
        default=Serve("--workers", "3", "--placement", "round-robin", "--max-num-seqs", "3", "--max-waiting", "2",
                      "--prometheus-file-sd", str(d / "default_sd.json"), env={"XDG_CACHE_HOME": str(d / "cache")}),
        strict=Serve("--model", str(ck), "--workers", "2", "--pg-strategy", "STRICT_SPREAD"), dir=d)
    try:
        yield procs
    finally:
        for s in (procs.flagged, procs.default, procs.strict):
            s.close()


@pytest.fixture(scope="module")
def flagged(launched):
    s = launched.flagged
    return SimpleNamespace(url=s.wait_serving().url, file_sd=launched.dir / "flagged_sd.json", serve=s)


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "flagged", **body}, timeout=120)


def test_served_model_name(flagged):
    models = httpx.get(flagged.url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["flagged"]
    r = complete(flagged.url, model="ck", prompt="hi", max_tokens=1)
    assert r.status_code == 404 and "`ck` does not exist" in r.json()["error"]["message"]
    assert complete(flagged.url, prompt="hi", max_tokens=1).status_code == 200


def test_max_model_len(flagged):
    assert httpx.get(flagged.url + "/v1/models", timeout=30).json()["data"][0]["max_model_len"] == 256
    assert admin(flagged.url)["max_model_len"] == 256
    r = complete(flagged.url, prompt=[5] * 200, max_tokens=57)
    assert r.status_code == 400 and "maximum context length is 256" in r.json()["error"]["message"]
    assert complete(flagged.url, prompt=[5] * 200, max_tokens=56).status_code == 200


def test_dtype_bfloat16_and_kv_cache_mb(flagged, ck, bf16_prompt):
    """bf16 weights are served: the greedy text is the in-process bf16 model's (not fp32's); the KV cache is
    --kv-cache-mb of bf16 blocks (twice as many blocks as fp32 would give)."""
    tok = Tokenizer.from_dir(ck)
    r = complete(flagged.url, prompt=bf16_prompt.prompt, max_tokens=12, temperature=0, ignore_eos=True).json()
    assert r["choices"][0]["text"] == tok.decode(bf16_prompt.bf16) != tok.decode(bf16_prompt.fp32)
    cfg = Mixtral.from_pretrained(ck).cfg
    assert admin(flagged.url)["num_kv_blocks"] == 3 * MiB // KVCache.bytes_per_block(cfg, 16, torch.bfloat16) \
        == 2 * (3 * MiB // KVCache.bytes_per_block(cfg, 16, torch.float32))


def test_max_num_batched_tokens(flagged):
    """A 100-token prompt is prefilled in chunks of at most 32 tokens: no step has more than 32 new tokens,
    and some have exactly 32."""
    assert complete(flagged.url, prompt=list(range(10, 110)), max_tokens=2).status_code == 200
    m = scrape(flagged.url + "/metrics")
    steps = by(m, "expertmesh_step_batch_tokens_bucket", "le")
    count = total(m, "expertmesh_step_batch_tokens_count")
    assert count > 0 and steps[("32.0",)] == count and steps[("16.0",)] < count
    assert admin(flagged.url)["last_step_tokens"] <= 32


def test_overlap(flagged, launched):
    """--overlap on: steps of two or more sequences run as two micro-batches (counted by the engine); one
    sequence alone never is. The default (off) never overlaps; a bad value is one line naming the flag."""
    before = admin(flagged.url)["overlapped_steps_total"]
    assert complete(flagged.url, prompt=[5, 6, 7], max_tokens=3, ignore_eos=True).status_code == 200
    assert admin(flagged.url)["overlapped_steps_total"] == before
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda i: complete(flagged.url, prompt=[5 + i, 6, 7], max_tokens=24, ignore_eos=True),
                           range(4)))
    assert [r.status_code for r in rs] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in rs)
    assert admin(flagged.url)["overlapped_steps_total"] > before
    assert admin(launched.default.wait_serving().url)["overlapped_steps_total"] == 0
    bad = cli("serve", "--overlap", "sometimes", timeout=60)
    assert bad.returncode == 2 and "--overlap" in bad.stderr and "invalid choice" in bad.stderr


def fill_to_the_bound(url: str, seen: list[int]) -> bool | None:
    """Open 5 long streams one at a time, each admitted before the next (3 running, then 2 waiting), then one
    request more: True if it got the 429, False if not; None if a stream ended before that (the machine was too
    slow for 480 tokens to outlast this), which says nothing about the flags. Every stream is ended on return."""
    stop, ended = threading.Event(), []

    def stream(i: int) -> None:
        body = {"prompt": f"stream {i}", "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
        finally:
            ended.append(i)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(5)]
    try:
        for i, t in enumerate(threads):
            t.start()
            want, deadline = (min(i + 1, 3), max(i - 2, 0)), time.monotonic() + 120  # (running, waiting)
            while True:
                state = admin(url)
                seen.append(state["num_running"])
                if (state["num_running"], state["num_waiting"]) == want:
                    break
                if ended:
                    return None
                assert time.monotonic() < deadline, (want, state["num_running"], state["num_waiting"])
                time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"prompt": "one too many", "max_tokens": 2}, timeout=120)
        if ended:
            return None
        assert r.status_code != 429 or (r.headers["retry-after"] == "1"
                                        and "queue is full" in r.json()["error"]["message"])
        return r.status_code == 429
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        deadline = time.monotonic() + 60
        while (s := admin(url))["num_running"] + s["num_waiting"]:
            assert time.monotonic() < deadline, s
            time.sleep(0.05)


def test_max_num_seqs_and_max_waiting(launched):
    """3 running at most (--max-num-seqs 3), 2 waiting at most (--max-waiting 2): the next one is a 429."""
    url, seen = launched.default.wait_serving().url, []
    for _ in range(3):
        outcome = fill_to_the_bound(url, seen)
        if outcome is not None:
            break
    assert outcome is True and max(seen) == 3


def test_no_expert_metrics(flagged):
    assert complete(flagged.url, prompt="metrics", max_tokens=3).status_code == 200
    router = scrape(flagged.url + "/metrics")
    assert total(router, "expertmesh_generation_tokens_total") > 0
    assert total(router, "expertmesh_worker_dispatch_tokens_total") > 0
    assert not {"expertmesh_expert_tokens_total", "expertmesh_expert_replicas"} & names(router)
    workers = worker_metrics(flagged.file_sd)
    assert sorted(workers) == ["worker-0", "worker-1"]
    for w in workers.values():
        assert "expertmesh_worker_expert_tokens_total" not in names(w)
        assert total(w, "expertmesh_worker_requests_total", code="OK") > 0


def test_pg_strategy(flagged, launched):
    """SPREAD (soft) serves on this one-node cluster (the flagged server uses it); STRICT_SPREAD cannot put 3
    bundles on 3 nodes here, and the serve exits with an error naming the flag."""
    assert httpx.get(flagged.url + "/health", timeout=30).status_code == 200
    s = launched.strict
    rc = s.proc.wait(timeout=240)
    deadline = time.monotonic() + 10  # the reader threads drain the pipes after the exit
    while "--pg-strategy STRICT_SPREAD" not in "".join(s.err) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rc != 0 and "--pg-strategy STRICT_SPREAD" in "".join(s.err), "".join(s.err)[-3000:]
    assert not any("expertmesh serving" in x for x in s.out)


def test_default_model_and_placement(launched):
    """No --model: a tiny random checkpoint is written once to the cache dir and served under its name;
    --placement round-robin: each of 3 workers hosts experts w, w+3, w+6 of every layer."""
    s, sd = launched.default, launched.dir / "default_sd.json"
    try:
        s.wait_serving()
        default_ck = launched.dir / "cache" / "expertmesh" / "tiny-seed0"
        assert (default_ck / "config.json").exists()
        assert any("first run only" in x for x in s.err)
        models = httpx.get(s.url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["tiny-seed0"]
        prompt = CANDIDATE_PROMPTS[0]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                       "ignore_eos": True}, timeout=120).json()
        local = Mixtral.from_pretrained(default_ck)
        assert r["choices"][0]["text"] == Tokenizer.from_dir(default_ck).decode(greedy_ids(local, prompt))
        assert admin(s.url)["num_kv_blocks"] == 512 * MiB // KVCache.bytes_per_block(local.cfg, 16, torch.float32)
        workers = worker_metrics(sd)
        assert sorted(workers) == ["worker-0", "worker-1", "worker-2"]
        for w, m in workers.items():
            hosted = by(m, "expertmesh_worker_expert_tokens_total", "layer", "expert")
            i = int(w.split("-")[1])
            assert set(hosted) == {(str(layer), str(e)) for layer in (0, 1) for e in range(i, 8, 3)}, w
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_generate_dtype(ck, bf16_prompt):
    ids = ",".join(map(str, bf16_prompt.prompt))
    out = {dtype: cli("generate", "--model", str(ck), "--prompt-ids", ids, "--max-tokens", "12", "--ignore-eos",
                      "--json", "--dtype", dtype) for dtype in ("bfloat16", "float32")}
    assert all(o.returncode == 0 for o in out.values()), [o.stderr[-2000:] for o in out.values()]
    assert json.loads(out["bfloat16"].stdout)["token_ids"] == bf16_prompt.bf16
    assert json.loads(out["float32"].stdout)["token_ids"] == bf16_prompt.fp32


def test_generate_placement_through_workers(ray_session, ck, bf16_prompt):
    """generate --workers 3 --placement round-robin (uneven groups: 3, 3 and 2 experts; on the test session's
    Ray, joined with --address) gives the in-process tokens; a placement not among the choices is refused."""
    ids = ",".join(map(str, bf16_prompt.prompt))
    o = cli("generate", "--model", str(ck), "--prompt-ids", ids, "--max-tokens", "12", "--ignore-eos", "--json",
            "--workers", "3", "--placement", "round-robin", "--address",
            ray_session.get_runtime_context().gcs_address, env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert o.returncode == 0, o.stderr[-3000:]
    assert json.loads(o.stdout)["token_ids"] == bf16_prompt.fp32
    bad = cli("generate", "--model", str(ck), "--prompt-ids", ids, "--placement", "random")
    assert bad.returncode == 2 and "--placement" in bad.stderr
