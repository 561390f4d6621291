"""Metrics of a real cluster (2 expert workers over gRPC, router HTTP API): router and workers agree exactly."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from cluster.deployment import ClusterConfig, ExpertCluster
from model.random_checkpoint import expert_ranks, write_checkpoint
from router.metrics import MetricsConfig
from router.scheduler import EngineConfig
from router.server import ServerConfig
from tests.router.test_metrics import REQUESTS, TOP_K, stream_completion
from tests.scrape import by, names, scrape, total

LAYERS, EXPERTS, HIDDEN = 2, 8, 64
# Router skew this strong sends every token to the same two experts of each layer (rank 1 and 2). With seed 0
# those are experts 2 and 7 in layer 0 (one on each worker of the contiguous placement: balanced) and 4 and 5 in
# layer 1 (both on worker-1, the other worker idle: max / mean = 2).
SEED, SKEW = 0, 30.0
HOT = {0: (2, 7), 1: (4, 5)}
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "expertmesh-dashboard.json"


def start_server(cluster: ExpertCluster, metrics: MetricsConfig | None = None) -> str:
    cfg = ServerConfig(port=0, engine=EngineConfig(num_kv_blocks=256, max_num_batched_tokens=64),
                       metrics=metrics or MetricsConfig())
    return ray.get(cluster.router.start_server.remote(cfg))


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics_cluster")
    write_checkpoint(d / "ck", "tiny", seed=SEED, router_skew=SKEW)
    with ExpertCluster(ClusterConfig(str(d / "ck"), 2)) as cluster:
        url = start_server(cluster)
        groups = cluster.write_file_sd(d / "sd" / "file_sd.json")
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            results = list(pool.map(lambda r: stream_completion(url, *r), REQUESTS))
        infos = cluster.worker_infos()
        yield SimpleNamespace(cluster=cluster, url=url, results=results, infos=infos, groups=groups,
                              file_sd=d / "sd" / "file_sd.json", router=scrape(url + "/metrics"),
                              workers={i["worker_id"]: scrape(i["metrics_url"]) for i in infos})


def test_tokens_streamed_and_expert_load_agree_with_workers(served):
    r, res = served.router, served.results
    assert total(r, "expertmesh_generation_tokens_total") == sum(x["streamed"] for x in res) == \
        sum(n for _, n in REQUESTS)
    processed = sum(p + n - 1 for p, n in REQUESTS)  # each request's last token never goes through the model
    router_load = by(r, "expertmesh_expert_tokens_total", "layer", "expert")
    assert len(router_load) == LAYERS * EXPERTS
    worker_load: dict = {}
    for w in served.workers.values():
        worker_load.update(by(w, "expertmesh_worker_expert_tokens_total", "layer", "expert"))
    assert worker_load == router_load  # every (layer, expert) lives on exactly one worker
    for layer in range(LAYERS):
        assert sum(n for (lay, _), n in router_load.items() if lay == str(layer)) == processed * TOP_K
    assert total(r, "expertmesh_num_preemptions_total") == 0


def test_per_worker_dispatch_metrics_match_the_workers(served):
    r = served.router
    for wid, w in served.workers.items():
        assert total(w, "expertmesh_worker_expert_tokens_total", worker=wid) == \
            total(r, "expertmesh_worker_dispatch_tokens_total", worker=wid)
        rpcs = total(w, "expertmesh_worker_requests_total", worker=wid, code="OK")
        assert rpcs > 0 and total(w, "expertmesh_worker_requests_total", worker=wid) == rpcs
        assert total(r, "expertmesh_dispatch_duration_seconds_count", worker=wid) == rpcs
        assert total(w, "expertmesh_worker_compute_seconds_count", worker=wid) == rpcs
    rows = total(r, "expertmesh_worker_dispatch_tokens_total")
    for direction in ("sent", "received"):  # rows x hidden x fp32, plus a little framing
        sent = total(r, "expertmesh_dispatch_bytes_total", direction=direction)
        assert rows * HIDDEN * 4 <= sent <= 1.05 * rows * HIDDEN * 4
    # A routing known to be unbalanced gives the known imbalance, and the workers' own counters agree.
    ranks = {layer: expert_ranks(EXPERTS, SEED, layer).tolist() for layer in range(LAYERS)}
    assert {layer: tuple(e for e in range(EXPERTS) if ranks[layer][e] <= 2) for layer in range(LAYERS)} == HOT
    router_load = by(r, "expertmesh_expert_tokens_total", "layer", "expert")
    assert {k for k, n in router_load.items() if n} == {(str(lay), str(e)) for lay, es in HOT.items() for e in es}
    imbalance = by(r, "expertmesh_layer_load_imbalance", "layer")
    assert imbalance == {("0",): 1.0, ("1",): 2.0}
    for layer in range(LAYERS):
        per_worker = [total(w, "expertmesh_worker_expert_tokens_total", layer=str(layer))
                      for w in served.workers.values()]
        assert imbalance[(str(layer),)] == max(per_worker) * len(per_worker) / sum(per_worker)
    assert by(r, "expertmesh_expert_replicas", "layer", "expert") == \
        {(str(i), str(e)): 1 for i in range(LAYERS) for e in range(EXPERTS)}


def test_histogram_counts_equal_requests(served):
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(served.router, f"expertmesh_{h}_count") == len(REQUESTS), h
    assert total(served.router, "expertmesh_request_success_total", finished_reason="length") == len(REQUESTS)


def test_file_sd_lists_router_and_workers(served):
    groups = json.loads(served.file_sd.read_text())
    assert groups == served.groups
    router_info = ray.get(served.cluster.router.info.remote())
    assert router_info["metrics_url"] == served.url + "/metrics"
    assert groups[0] == {"targets": [served.url.split("//")[1]], "labels": {"job": "expertmesh-router"}}
    assert groups[1:] == [{"targets": [i["metrics_url"].split("//")[1].removesuffix("/metrics")],
                           "labels": {"job": "expertmesh-worker", "worker": i["worker_id"]}}
                          for i in served.infos]
    assert [i["worker_id"] for i in served.infos] == ["worker-0", "worker-1"]


def test_dashboard_uses_only_exported_metrics(served):
    exported = names(served.router).union(*(names(w) for w in served.workers.values()))
    dash = json.loads(DASHBOARD.read_text())
    used = {m for p in dash["panels"] for t in p.get("targets", [])
            for m in re.findall(r"expertmesh_[a-z0-9_]+", t["expr"])}
    assert len(used) >= 15 and used <= exported, used - exported


def test_loadtest_expert_view_matches_the_router_counters(served):
    """`expertmesh loadtest`'s expert view, computed from this real router's /metrics, equals the router's own
    counter deltas over the run, and shows the known skew: 2 of 8 experts per layer take every token (max/mean
    4, hottest share 50%), and worker-1 gets layer 1 alone (dispatched tokens 1 : 3, max/mean 1.5)."""
    from bench.loadtest import LoadTestConfig, run_load_test

    before = scrape(served.url + "/metrics")
    lt = run_load_test(LoadTestConfig(served.url, 6, input_len=8, output_len=4, progress=False))
    after = scrape(served.url + "/metrics")
    r, view = lt.result, lt.result["expert_view"]
    assert r["completed"] == 6 and view["available"], view

    def delta(name, *keys):
        old = by(before, name, *keys)
        return {k: v - old.get(k, 0) for k, v in by(after, name, *keys).items()}

    experts = delta("expertmesh_expert_tokens_total", "layer", "expert")
    processed = sum(p + n - 1 for p, n in zip(r["input_lens"], r["output_lens"], strict=True))
    assert [lay["layer"] for lay in view["layers"]] == [str(i) for i in range(LAYERS)]
    for lay in view["layers"]:
        loads = {e: n for (layer, e), n in experts.items() if layer == lay["layer"]}
        assert lay["tokens"] == sum(loads.values()) == processed * TOP_K
        assert (lay["experts"], lay["max_mean"], lay["hottest_share"]) == (EXPERTS, 4.0, 0.5)
        assert loads[lay["hottest_expert"]] == max(loads.values())
        assert int(lay["hottest_expert"]) in HOT[int(lay["layer"])]
    assert view["expert_max_mean"] == 4.0
    workers = {w: n for (w,), n in delta("expertmesh_worker_dispatch_tokens_total", "worker").items()}
    assert view["workers"]["tokens"] == workers == {"worker-0": processed * 1, "worker-1": processed * 3}
    assert view["workers"]["max_mean"] == 1.5
    counts = {w: n for (w,), n in delta("expertmesh_dispatch_duration_seconds_count", "worker").items()}
    assert {w: d["count"] for w, d in view["dispatch"].items()} == counts and min(counts.values()) > 0
    assert all(d["mean_ms"] > 0 and d["p99_ms"] > 0 for d in view["dispatch"].values())


def test_no_expert_metrics_flag(served, tmp_path):
    """Router without per-expert series (a restarted server in the same cluster); a worker without them."""
    from workers.expert_worker import ExpertWorker
    from workers.metrics import start_metrics_server

    cluster = served.cluster
    ray.get(cluster.router.stop_server.remote())
    url = start_server(cluster, MetricsConfig(expert_metrics=False))
    stream_completion(url, 6, 3)
    r = scrape(url + "/metrics")
    assert total(r, "expertmesh_generation_tokens_total") == 3
    assert total(r, "expertmesh_worker_dispatch_tokens_total") == (6 + 3 - 1) * TOP_K * LAYERS
    assert not {"expertmesh_expert_tokens_total", "expertmesh_expert_replicas"} & names(r)

    write_checkpoint(tmp_path / "ck", "tiny", seed=7)
    worker = ExpertWorker(str(tmp_path / "ck"), [(0, 1), (1, 1)], worker_id="w9")
    server, port = start_metrics_server(worker, expert_metrics=False)
    try:
        w = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert "expertmesh_worker_expert_tokens_total" not in names(w)
    assert total(w, "expertmesh_worker_requests_total", worker="w9", code="OK") == 0


def test_file_sd_written_atomically_and_only_on_change(tmp_path):
    from cluster.file_sd import file_sd_groups, write_file_sd

    path = tmp_path / "sd" / "file_sd.json"
    groups = file_sd_groups("http://10.0.0.1:8000/metrics", [("worker-0", "http://10.0.0.2:9100/metrics")])
    assert groups == [{"targets": ["10.0.0.1:8000"], "labels": {"job": "expertmesh-router"}},
                      {"targets": ["10.0.0.2:9100"], "labels": {"job": "expertmesh-worker", "worker": "worker-0"}}]
    assert write_file_sd(path, groups) and json.loads(path.read_text()) == groups
    inode = path.stat().st_ino
    assert not write_file_sd(path, groups) and path.stat().st_ino == inode  # unchanged: not rewritten
    moved = file_sd_groups(None, [("worker-0", "http://10.0.0.2:9200/metrics")])
    assert write_file_sd(path, moved) and json.loads(path.read_text()) == moved
    assert path.stat().st_ino != inode  # replaced by rename, never written in place
    assert [p.name for p in path.parent.iterdir()] == ["file_sd.json"]
