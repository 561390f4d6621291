"""Router /metrics over the real HTTP API (in-process experts): exact token counts, histogram counts, flags."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import prometheus_client
import pytest
import torch

from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from router.expert_metrics import CountingExperts, ExpertMetrics
from router.metrics import TTFT_BUCKETS, Histogram, MetricsConfig
from router.remote_experts import RoutingTable
from router.scheduler import EngineConfig
from router.server import RouterServer, ServerConfig
from tests.scrape import by, parse, scrape, total

# (prompt length, max_tokens): prompts longer than the step budget are prefilled in chunks
REQUESTS = [(5, 3), (17, 8), (33, 1), (40, 12), (9, 5), (90, 7)]
TOP_K = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics") / "ck"
    write_checkpoint(d, "tiny", seed=5)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Mixtral.from_pretrained(model_dir)
    torch.set_num_threads(threads)


def start(model, model_dir, metrics: MetricsConfig) -> RouterServer:
    engine = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=64)  # never preempts these requests
    return RouterServer(model, str(model_dir), ServerConfig(port=0, engine=engine, metrics=metrics))


def stream_completion(url: str, prompt_len: int, max_tokens: int) -> dict:
    """Stream one greedy completion; count the tokens in the SSE chunks (logprobs list one per token)."""
    body = {"prompt": list(range(10, 10 + prompt_len)), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
    streamed, usage = 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                streamed += len(c["logprobs"]["tokens"])
            usage = chunk.get("usage") or usage
    return {"streamed": streamed, **usage}


def wait_idle(srv: RouterServer) -> None:
    deadline = time.monotonic() + 30
    while srv.engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(model, model_dir):
    srv = start(model, model_dir, MetricsConfig())
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(lambda r: stream_completion(srv.url, *r), REQUESTS))
    wait_idle(srv)
    yield SimpleNamespace(srv=srv, results=results, samples=scrape(srv.url + "/metrics"))
    srv.drain_and_stop()


def test_token_counters_equal_what_was_streamed(served):
    s, res = served.samples, served.results
    assert [r["completion_tokens"] for r in res] == [n for _, n in REQUESTS]
    assert [r["streamed"] for r in res] == [n for _, n in REQUESTS]
    assert total(s, "expertmesh_generation_tokens_total") == sum(r["streamed"] for r in res)
    assert total(s, "expertmesh_prompt_tokens_total") == sum(r["prompt_tokens"] for r in res)
    assert total(s, "expertmesh_num_preemptions_total") == 0
    assert total(s, "expertmesh_failed_forwards_total") == 0 and total(s, "expertmesh_engine_recovering") == 0


def test_expert_tokens_are_tokens_through_the_model_times_top_k(served):
    # every prompt token and every generated token but each request's last went through the model once
    processed = sum(p + n - 1 for p, n in REQUESTS)
    per_layer = by(served.samples, "expertmesh_expert_tokens_total", "layer")
    assert per_layer == {("0",): processed * TOP_K, ("1",): processed * TOP_K}
    assert len(by(served.samples, "expertmesh_expert_tokens_total", "layer", "expert")) == 2 * 8
    assert total(served.samples, "expertmesh_step_batch_tokens_sum") == processed


def test_histogram_counts_equal_requests(served):
    s, n = served.samples, len(REQUESTS)
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(s, f"expertmesh_{h}_count") == n, h
        assert total(s, f"expertmesh_{h}_bucket", le="+Inf") == n, h
    assert total(s, "expertmesh_inter_token_latency_seconds_count") == sum(m - 1 for _, m in REQUESTS)
    assert total(s, "expertmesh_request_success_total", finished_reason="length") == n
    assert total(s, "expertmesh_request_success_total", finished_reason="abort") == 0
    steps = total(s, "expertmesh_step_duration_seconds_count")
    assert steps >= max(m for _, m in REQUESTS) and total(s, "expertmesh_step_batch_tokens_count") == steps
    assert total(s, "expertmesh_num_requests_running") == total(s, "expertmesh_num_requests_waiting") == 0
    assert total(s, "expertmesh_kv_cache_usage_ratio") == 0.0
    # no dispatch series in-process: nothing is dispatched
    assert total(s, "expertmesh_worker_dispatch_tokens_total") == 0


def test_abort_is_counted(served):
    srv = served.srv
    body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first token arrived; leaving closes the connection
    deadline = time.monotonic() + 30
    while total(after := scrape(srv.url + "/metrics"), "expertmesh_request_success_total",
                finished_reason="abort") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = served.samples
    assert total(after, "expertmesh_e2e_request_latency_seconds_count") == \
        total(before, "expertmesh_e2e_request_latency_seconds_count") + 1


def test_flags_drop_expert_series_or_everything(model, model_dir, served):
    backend = model.experts  # wrapped while `served` counts
    srv = start(model, model_dir, MetricsConfig(expert_metrics=False))
    try:
        stream_completion(srv.url, 4, 2)
        s = scrape(srv.url + "/metrics")
    finally:
        srv.drain_and_stop()
    assert total(s, "expertmesh_generation_tokens_total") == 2
    assert not [n for n, _, _ in s if n.startswith(("expertmesh_expert_tokens", "expertmesh_expert_replicas"))]
    assert model.experts is backend
    srv = start(model, model_dir, MetricsConfig(enabled=False))
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 404
        assert srv.engine.metrics is None and model.experts is backend
    finally:
        srv.drain_and_stop()


def test_histogram_matches_prometheus_client():
    ours, ref = Histogram(TTFT_BUCKETS), prometheus_client.Histogram(
        "h", "", buckets=TTFT_BUCKETS, registry=prometheus_client.CollectorRegistry())
    values = [0.0, 0.001, 0.0010001, 0.5, 2560.0, 3000.0] + torch.rand(200).mul(3).tolist()
    for v in values:
        ours.observe(v)
        ref.observe(v)
    fam = prometheus_client.metrics_core.HistogramMetricFamily("h", "", labels=[])
    ours.add_to(fam, [])
    want = {(s.name, s.labels.get("le")): s.value for s in ref.collect()[0].samples if s.name != "h_created"}
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k]) for k in want)


class FakeRemote:
    """What ExpertMetrics reads from RemoteExperts: a routing table and dispatch listeners."""

    def __init__(self):
        self.table = RoutingTable.from_placement([[0, 1], [2, 3]], ["h:1", "h:2"], 2, ["worker-0", "worker-1"])
        self.listeners = []

    def add_listener(self, fn):
        self.listeners.append(fn)

    def remove_listener(self, fn):
        self.listeners.remove(fn)

    def on_dispatch(self, *event):
        for fn in self.listeners:
            fn(*event)


def test_dispatch_series_and_imbalance_window():
    backend = FakeRemote()
    model = SimpleNamespace(cfg=SimpleNamespace(num_hidden_layers=2, num_local_experts=4), device="cpu",
                            experts=backend)
    m = ExpertMetrics(model, MetricsConfig(imbalance_window_s=0.0))  # window 0: since the previous scrape
    registry = prometheus_client.CollectorRegistry()
    registry.register(m)

    def scrape_now():
        return parse(prometheus_client.generate_latest(registry).decode())

    backend.on_dispatch(0, "h:1", [0, 1], [20, 10], 0.002, 1000, 900)
    backend.on_dispatch(0, "h:2", [2], [10], 0.02, 400, 300)
    backend.on_dispatch(1, "h:2", [3], [8], 0.0003, 300, 200)
    s = scrape_now()
    assert by(s, "expertmesh_worker_dispatch_tokens_total", "worker") == {("worker-0",): 30, ("worker-1",): 18}
    assert by(s, "expertmesh_dispatch_duration_seconds_count", "worker") == {("worker-0",): 1, ("worker-1",): 2}
    assert total(s, "expertmesh_dispatch_duration_seconds_bucket", worker="worker-1", le="0.0005") == 1
    assert by(s, "expertmesh_dispatch_bytes_total", "direction") == {("sent",): 1700, ("received",): 1400}
    assert by(s, "expertmesh_layer_load_imbalance", "layer") == {("0",): 1.5, ("1",): 2.0}  # 30:10, 0:8
    assert total(s, "expertmesh_expert_replicas") == 8
    tokens = by(s, "expertmesh_expert_tokens_total", "layer", "expert")  # from the same dispatch events
    assert (tokens[("0", "0")], tokens[("0", "2")], tokens[("1", "3")], tokens[("1", "0")]) == (20, 10, 8, 0)
    backend.on_dispatch(0, "h:2", [2], [10], 0.001, 400, 300)  # only worker-1 since the last scrape
    s = scrape_now()
    assert by(s, "expertmesh_layer_load_imbalance", "layer") == {("0",): 2.0, ("1",): 1.0}  # layer 1 idle
    m.detach()
    backend.on_dispatch(0, "h:1", [0], [5], 0.001, 1, 1)  # not counted after detach
    assert total(scrape_now(), "expertmesh_worker_dispatch_tokens_total") == 58


def test_expert_counting_is_per_forward_and_per_thread():
    tokens = torch.zeros(3, 4, dtype=torch.int64)
    counting = CountingExperts(lambda layer, h, ids, w: layer, tokens)

    def forwards(rows: int) -> None:
        ids = torch.arange(rows * 2).remainder(4).view(rows, 2)  # every expert equally often
        for _ in range(300):
            for layer in range(3):
                assert counting(layer, None, ids, None) == layer

    threads = [threading.Thread(target=forwards, args=(n,)) for n in (2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counting(0, None, torch.zeros(5, 2, dtype=torch.long), None)  # an unfinished forward counts nothing
    assert tokens.tolist() == [[300 * (2 + 6) * 2 // 4] * 4] * 3
    assert tokens.sum() == 3 * 300 * (2 + 6) * 2


def test_overhead_bench_runs():
    from bench.metrics_overhead import OverheadConfig, format_table, measure

    res = measure(OverheadConfig(hidden_size=64, intermediate_size=128, batch=4, decode_tokens=4, rounds=1))
    assert len(res["on_tok_s"]) == len(res["off_tok_s"]) == 1 and res["recording_us_per_step"] > 0
    assert "overhead" in format_table(res)
