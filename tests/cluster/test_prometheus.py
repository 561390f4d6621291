"""A real Prometheus (Debian's `prometheus` package) on deploy/prometheus/prometheus.yml and the cluster's file_sd
file scrapes router and workers; PromQL gives the same numbers as a direct scrape, and the dashboard's queries
parse and evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.deployment import ClusterConfig, ExpertCluster
from model.random_checkpoint import write_checkpoint
from tests.cluster.test_metrics_cluster import DASHBOARD, start_server
from tests.ports import free_port
from tests.router.test_metrics import REQUESTS, stream_completion
from tests.scrape import by, scrape

CONFIG = Path(__file__).parents[2] / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_WAIT_S = 60


@pytest.fixture(scope="module")
def cluster_sd(ray_session, tmp_path_factory):
    """A 2-worker cluster after a known set of requests, its file_sd file, and direct scrapes of every target."""
    d = tmp_path_factory.mktemp("prometheus")
    write_checkpoint(d / "ck", "tiny", seed=9)
    with ExpertCluster(ClusterConfig(str(d / "ck"), 2)) as cluster:
        url = start_server(cluster)
        cluster.write_file_sd(d / "file_sd.json")
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            list(pool.map(lambda r: stream_completion(url, *r), REQUESTS))
        workers = [scrape(i["metrics_url"]) for i in cluster.worker_infos()]
        yield d, scrape(url + "/metrics"), workers


@pytest.fixture(scope="module")
def prometheus(cluster_sd):
    """Prometheus on the repo's config with the file_sd path substituted; killed at the end."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"no prometheus binary ({PROMETHEUS}); install it: apt-get install -y prometheus")
    d = cluster_sd[0]
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(d / "file_sd.json")]
    del cfg["scrape_configs"][0]["http_sd_configs"]  # file_sd alone here (tests/deploy covers http_sd)
    with run_prometheus(d, cfg) as base:
        yield base


@contextmanager
def run_prometheus(d: Path, cfg: dict, ready_s: float = 30):
    """A Prometheus process on `cfg` (written to d/prometheus.yml, tsdb and log in d), yielding its base URL once
    /-/ready answers; killed on exit."""
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(d / "prometheus.log", "w")  # closed below
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while not _ready(base):
            assert proc.poll() is None and time.monotonic() < deadline, (d / "prometheus.log").read_text()[-3000:]
            time.sleep(0.2)
        yield base
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(base: str, promql: str) -> list[dict]:
    r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=10).json()
    assert r["status"] == "success", (promql, r)
    return r["data"]["result"]


def wait_for(base: str, promql: str, key: str, want: dict[tuple[str, ...], float]) -> dict:
    """Poll until `promql` (sum by key) returns `want`: i.e. Prometheus scraped after the requests."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        got = {(r["metric"].get(key, ""),): float(r["value"][1]) for r in query(base, promql)}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_promql_equals_direct_scrape(cluster_sd, prometheus):
    _, router, workers = cluster_sd
    want = by(router, "expertmesh_expert_tokens_total", "layer")
    assert len(want) == 2 and all(v > 0 for v in want.values())
    assert wait_for(prometheus, "sum by (layer) (expertmesh_expert_tokens_total)", "layer", want) == want
    from_workers: dict = {}
    for w in workers:
        for k, v in by(w, "expertmesh_worker_expert_tokens_total", "layer").items():
            from_workers[k] = from_workers.get(k, 0) + v
    assert from_workers == want
    assert wait_for(prometheus, "sum by (layer) (expertmesh_worker_expert_tokens_total)", "layer", want) == want
    up = {(r["metric"]["job"], r["metric"].get("worker", "")): r["value"][1] for r in query(prometheus, "up")}
    assert up == {("expertmesh-router", ""): "1", ("expertmesh-worker", "worker-0"): "1",
                  ("expertmesh-worker", "worker-1"): "1"}
    # honor_labels: worker series keep their own worker label, no exported_worker copy
    series = query(prometheus, "expertmesh_worker_requests_total")
    assert series and all("exported_worker" not in r["metric"] for r in series)
    gen = query(prometheus, "sum(expertmesh_generation_tokens_total)")
    assert float(gen[0]["value"][1]) == sum(n for _, n in REQUESTS)


def test_dashboard_queries_evaluate(prometheus):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for e in exprs:
        query(prometheus, e.replace("$__rate_interval", "1m"))
    heat, deadline = [], time.monotonic() + SCRAPE_WAIT_S
    while len(heat) < 2 * 8 and time.monotonic() < deadline:  # rate() needs a second scrape
        time.sleep(0.5)
        heat = query(prometheus, "sum by (layer, expert) (rate(expertmesh_expert_tokens_total[1m]))")
    assert len(heat) == 2 * 8  # the heatmap's layer x expert cells
