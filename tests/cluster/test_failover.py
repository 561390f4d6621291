"""Failover with real Ray actors and real processes: SIGKILL or SIGSTOP an expert worker while requests run; the
controller replaces it, the router's engine holds and retries the step, and every request finishes with the
text of a failure-free run. A request fails only at its deadline or when no replacement can be placed."""

import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time

import httpx
import pytest
import ray

from bench.fault_injection import WorkerKiller
from cluster.controller import Controller, ControllerConfig
from cluster.deployment import ClusterConfig, ExpertCluster
from router.scheduler import EngineConfig
from router.server import ServerConfig
from tests.model.hf_reference import write_hf_checkpoint

DISPATCH_TIMEOUT_S = 3.0
PROMPTS = [[5 + i, 17, 3 * i + 1, 250 - i, 42, 7] for i in range(8)]
MAX_TOKENS = 64
LONG_PROMPT = [(7 * i) % 290 + 3 for i in range(440)]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("failover")
    write_hf_checkpoint(d, seed=12)
    from model.tokenizer import build_byte_level_bpe, write_tokenizer_files
    write_tokenizer_files(d, build_byte_level_bpe(300), 1, 2, 512)
    return d


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)
    return value


class Streams:
    """Greedy streaming completions on threads; progress[i] counts chunks, times[i] their arrival times."""

    def __init__(self, url: str, model: str, prompts, max_tokens: int):
        self.progress = [0] * len(prompts)
        self.times: list[list[float]] = [[] for _ in prompts]
        self.texts: list[str | None] = [None] * len(prompts)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._one, args=(url, model, i, p, max_tokens), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _one(self, url, model, i, prompt, max_tokens):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        text = []
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=180) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        raise AssertionError(chunk["error"]["message"])
                    text.append(chunk["choices"][0]["text"])
                    self.progress[i] += 1
                    self.times[i].append(time.monotonic())
            self.texts[i] = "".join(text)
        except Exception as e:  # noqa: BLE001 - reported by join()
            self.errors.append(f"stream {i}: {type(e).__name__}: {e}")

    def join(self, timeout_s: float = 180) -> list[str]:
        for t in self.threads:
            t.join(timeout_s)
        assert not self.errors, self.errors
        return self.texts


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def worker_pid(cluster, wid: str) -> int:
    return ray.get(cluster.slots[wid].actor.info.remote(), timeout=60)["pid"]


@pytest.fixture(scope="module")
def served(ray_session, ck):
    cluster = ExpertCluster(ClusterConfig(str(ck), 2, dispatch_timeout_s=DISPATCH_TIMEOUT_S))
    controller = None
    try:
        engine = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=16)
        url = ray.get(cluster.router.start_server.remote(ServerConfig(port=0, engine=engine)))
        controller = Controller(cluster, ControllerConfig(interval_s=0.2, hung_after_s=DISPATCH_TIMEOUT_S)).start()
        reference = Streams(url, ck.name, PROMPTS, MAX_TOKENS).join()
        yield cluster, controller, url, reference
    finally:
        if controller is not None:
            controller.stop()
        cluster.shutdown()


def test_sigkill_mid_decode_twice_every_stream_finishes_unchanged(served, ck, caplog):
    cluster, controller, url, reference = served
    caplog.set_level(logging.WARNING, logger="cluster.controller")
    streams = Streams(url, ck.name, PROMPTS, MAX_TOKENS)
    wait_for(lambda: min(streams.progress) >= 2, 120, "every stream to have tokens")
    recoveries = []
    for _ in range(2):  # the first worker, then its replacement
        before = controller.replacements
        pid = worker_pid(cluster, "worker-1")
        at_kill = list(streams.progress)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert max(at_kill) < MAX_TOKENS, "a stream finished before the kill: make the streams longer"
        wait_for(lambda b=before: controller.replacements > b, 60, "the controller to replace worker-1")
        # resumed: every stream two tokens further (one could be from a step that ended as the kill landed)
        wait_for(lambda a=at_kill: all(p >= min(q + 2, MAX_TOKENS)
                                       for p, q in zip(streams.progress, a, strict=True)), 60, "streams to resume")
        recoveries.append(time.monotonic() - killed)
    assert streams.join() == reference
    assert metric(url, "expertmesh_worker_restarts_total", '{worker="worker-1"}') == 2
    assert metric(url, "expertmesh_step_retries_total") >= 2
    assert metric(url, "expertmesh_recovery_seconds_count") >= 2
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    # the controller's log: one line per failure and one per recovery
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster.controller"]
    assert all("\n" not in m for m in lines), lines
    assert len([m for m in lines if re.match(r"expert worker worker-1 \(\S+\) failed: .+; replacing it$", m)]) == 2
    assert len([m for m in lines if re.match(r"expert plane repaired in [\d.]+ s: worker-1 now at \S+$", m)]) == 2
    print(f"kill to streams resumed, by replacement: {', '.join(f'{s:.2f} s' for s in recoveries)}")


def test_sigkill_during_chunked_prefill(served, ck):
    cluster, controller, url, _ = served
    body = {"model": ck.name, "prompt": LONG_PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    want = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    stats = lambda: ray.get(cluster.router.engine_stats.remote(), timeout=30)  # noqa: E731
    generated = stats()["generation_tokens_total"]
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                   timeout=180)), daemon=True)
    before, pid = controller.replacements, worker_pid(cluster, "worker-0")
    t.start()
    wait_for(lambda: stats()["num_running"] == 1, 60, "the prefill to start", poll_s=0.005)
    os.kill(pid, signal.SIGKILL)
    mid_prefill = stats()["generation_tokens_total"] == generated  # 440 prompt tokens in chunks of 16
    t.join(180)
    assert mid_prefill, "the kill landed after the prefill: use a longer prompt"
    assert controller.replacements == before + 1
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == want


def test_sigstop_detected_within_deadline_recovered_and_sigcont_harmless(served, ck):
    cluster, controller, url, reference = served
    before, pid = controller.replacements, worker_pid(cluster, "worker-0")
    streams = Streams(url, ck.name, PROMPTS, MAX_TOKENS)
    wait_for(lambda: min(streams.progress) >= 2, 120, "every stream to have tokens")
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=30).status_code == 503, DISPATCH_TIMEOUT_S + 5,
                 "/health to report the hung worker")
        wait_for(lambda: controller.replacements > before, 60, "the hung worker to be replaced")
        replaced = time.monotonic() - stopped
        assert streams.join() == reference
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # the old process, if it still exists, wakes up ...
        except ProcessLookupError:
            pass
    assert Streams(url, ck.name, PROMPTS, MAX_TOKENS).join() == reference  # ... and changes nothing
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    print(f"SIGSTOP to replaced worker: {replaced:.2f} s (Dispatch deadline {DISPATCH_TIMEOUT_S} s)")


def test_loadtest_killer_kills_a_serving_worker_through_ray(served):
    cluster, controller, url, _ = served
    before = controller.replacements
    killer = WorkerKiller(every_s=20.0)  # this process is already on the cluster's Ray
    names = killer.workers()
    assert len(names) == 2 and all(n.startswith("expertmesh-") for n in names)
    killed = killer.kill_one()
    assert killed in names and killer.summary()["kills"] == 1
    wait_for(lambda: controller.replacements > before, 60, "the controller to replace the killed worker")
    wait_for(lambda: killed not in killer.workers() and len(killer.workers()) == 2, 60, "the new worker's name")


def test_deadline_when_no_capacity_then_recovery_and_router_restart(ray_session, ck):
    cluster = ExpertCluster(ClusterConfig(str(ck), 1, dispatch_timeout_s=DISPATCH_TIMEOUT_S,
                                          replace_timeout_s=8.0))
    urls = []

    def start_server(router):
        urls.append(ray.get(router.start_server.remote(server_cfg)))

    controller = Controller(cluster, ControllerConfig(interval_s=0.2), start_server=start_server)
    try:
        server_cfg = ServerConfig(port=0, engine=EngineConfig(num_kv_blocks=64, request_timeout_s=4.0))
        start_server(cluster.router)
        url = urls[0]
        body = {"model": ck.name, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        want = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        controller.start()
        ok_cfg = cluster.cfg
        cluster.cfg = dataclasses.replace(ok_cfg, worker_cpus=64)  # no node can place a replacement
        os.kill(worker_pid(cluster, "worker-0"), signal.SIGKILL)
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 503 and "deadline" in r.json()["error"]["message"], r.text
        assert 3.5 < took < 8.0  # at its own deadline (4 s), before the controller gives up (8 s)
        wait_for(lambda: "cannot replace" in httpx.post(url + "/v1/completions", json=body, timeout=60).text, 60,
                 "requests to fail at once with the controller's verdict")
        assert httpx.get(url + "/health", timeout=30).status_code == 503

        cluster.cfg = ok_cfg  # capacity is back: the next tick replaces the worker
        wait_for(lambda: httpx.get(url + "/health", timeout=30).status_code == 200, 60, "/health back to 200")
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == want

        # the router dies: the controller recreates it and starts its server; /health answers 200 again
        os.kill(ray.get(cluster.router.info.remote(), timeout=30)["pid"], signal.SIGKILL)
        wait_for(lambda: controller.router_restarts == 1, 90, "the router to be recreated")
        assert httpx.get(urls[-1] + "/health", timeout=30).status_code == 200
        assert httpx.post(urls[-1] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == want
    finally:
        controller.stop()
        cluster.shutdown()
