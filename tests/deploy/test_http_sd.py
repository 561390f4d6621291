"""The router's Prometheus HTTP service discovery on a real cluster (expert workers over gRPC, router HTTP API):
it lists the router and every live worker behind the API key, follows the workers as they come and go, and a
real Prometheus on deploy/prometheus/prometheus.yml, discovering through it, scrapes router and worker series."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import yaml

from cluster.deployment import ClusterConfig, ExpertCluster
from model.random_checkpoint import write_checkpoint
from router.scheduler import EngineConfig
from router.server import ServerConfig
from tests.cluster.test_prometheus import PROMETHEUS, query, run_prometheus

CONFIG = Path(__file__).parents[2] / "deploy" / "prometheus" / "prometheus.yml"
PATH = "/v1/admin/prometheus_targets"
KEY = "http-sd-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE_S = 90


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("http_sd")
    write_checkpoint(d / "ck", "tiny", seed=5)
    with ExpertCluster(ClusterConfig(str(d / "ck"), 2)) as cluster:
        cfg = ServerConfig(port=0, api_key=KEY, served_model_name="tiny",
                           engine=EngineConfig(num_kv_blocks=256, max_num_batched_tokens=64))
        url = ray.get(cluster.router.start_server.remote(cfg))
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text  # worker series exist once a Dispatch ran
        yield SimpleNamespace(cluster=cluster, url=url, dir=d)


def targets(url: str) -> list[dict]:
    r = httpx.get(url + PATH, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def workers_listed(groups: list[dict]) -> dict[str, str]:
    """worker id -> "host:port" of its metrics target."""
    return {g["labels"]["worker"]: g["targets"][0] for g in groups if g["labels"]["job"] == "expertmesh-worker"}


def test_lists_router_and_every_worker_behind_the_key(served):
    assert httpx.get(served.url + PATH, timeout=30).status_code == 401
    groups = targets(served.url)
    # the same groups as the file_sd file (from the workers' actors, not the router's table)
    assert groups == served.cluster.refresh_file_sd()
    router = [g for g in groups if g["labels"] == {"job": "expertmesh-router"}]
    assert router == [{"targets": [served.url.split("//")[1]], "labels": {"job": "expertmesh-router"}}]
    infos = served.cluster.worker_infos()
    assert workers_listed(groups) == {i["worker_id"]: i["metrics_url"].split("//")[1].split("/")[0] for i in infos}
    assert len(groups) == 1 + 2
    for target in [g["targets"][0] for g in groups]:  # every target really serves metrics
        assert httpx.get(f"http://{target}/metrics", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def prometheus(served):
    """Prometheus on the repo's config, discovering through the router's http_sd only (file_sd removed)."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip(f"no prometheus binary ({PROMETHEUS}); install it: apt-get install -y prometheus")
    d = served.dir
    (d / "api-key").write_text(KEY)
    cfg = yaml.safe_load(CONFIG.read_text())
    job = cfg["scrape_configs"][0]
    del job["file_sd_configs"]
    sd = job["http_sd_configs"][0]
    assert sd["url"].endswith(PATH) and "credentials_file" in sd["authorization"]
    sd.update(url=served.url + PATH, refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(d / "api-key")
    with run_prometheus(d, cfg, ready_s=DEADLINE_S) as base:
        yield base


def wait_until(cond, explain=lambda: "", proc=None, deadline_s: float = DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while not (got := cond()):
        assert proc is None or proc.poll() is None, explain()
        assert time.monotonic() < deadline, explain()
        time.sleep(0.5)
    return got


def up(base: str) -> dict[tuple[str, str], str]:
    return {(r["metric"]["job"], r["metric"].get("worker", "")): r["value"][1] for r in query(base, "up")}


def test_prometheus_scrapes_router_and_workers_through_http_sd(served, prometheus):
    want = {("expertmesh-router", ""): "1", ("expertmesh-worker", "worker-0"): "1",
            ("expertmesh-worker", "worker-1"): "1"}
    wait_until(lambda: up(prometheus) == want, lambda: f"up: {up(prometheus)}")
    router = wait_until(lambda: query(prometheus, 'expertmesh_num_requests_running{job="expertmesh-router"}'))
    assert len(router) == 1
    workers = wait_until(lambda: query(prometheus, "sum by (worker) (expertmesh_worker_requests_total)"))
    assert {r["metric"]["worker"] for r in workers} == {"worker-0", "worker-1"}
    active = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert len(active) == 3


def test_follows_workers_as_they_come_and_go(served, prometheus):
    """A worker added (a replica), one replaced at a new address, one removed: the endpoint answers the router's
    live table each time, and Prometheus follows."""
    c = served.cluster
    before = workers_listed(targets(served.url))
    added = c.add_worker(c.worker_pairs()[1])
    c.push_table()
    now = workers_listed(targets(served.url))
    assert set(now) == {"worker-0", "worker-1", added} and now["worker-1"] == before["worker-1"]
    wait_until(lambda: up(prometheus).get(("expertmesh-worker", added)) == "1", lambda: f"up: {up(prometheus)}")

    c.replace_worker("worker-1")
    c.push_table()
    now = workers_listed(targets(served.url))
    assert set(now) == {"worker-0", "worker-1", added} and now["worker-1"] != before["worker-1"]

    c.remove_worker(added)
    c.push_table()
    assert workers_listed(targets(served.url)).keys() == {"worker-0", "worker-1"}
    wait_until(lambda: ("expertmesh-worker", added) not in up(prometheus), lambda: f"up: {up(prometheus)}")
