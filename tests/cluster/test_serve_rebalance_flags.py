"""`expertmesh serve --redundant-experts --autoscale --min/--max-workers --rebalance-interval` through the real CLI:
the settings reach the placement controller, the replicas exist from the start, and the admin routes answer."""

from __future__ import annotations

import time

import httpx
import pytest

from model.random_checkpoint import write_checkpoint
from tests.cluster.test_serve_flags import Serve
from tests.scrape import by, scrape, total

KEY = "rebalance-flags-key"
LAYERS, EXPERTS, REDUNDANT = 2, 8, 2
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ck = write_checkpoint(tmp_path_factory.mktemp("rebalance_flags") / "ck", "tiny", seed=4, router_skew=1.2)
    s = Serve("--model", str(ck), "--workers", "2", "--redundant-experts", str(REDUNDANT), "--autoscale",
              "--min-workers", "2", "--max-workers", "3", "--rebalance-interval", "5", "--max-num-seqs", "4",
              env={"EXPERTMESH_API_KEY": KEY})
    try:
        yield s.wait_serving()
    finally:
        s.close()


def placement(url: str) -> dict:
    r = httpx.get(url + "/v1/admin/placement", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_flags_reach_the_controller_and_replicas_exist_from_the_start(served):
    url = served.url
    assert httpx.get(url + "/v1/admin/placement", timeout=30).status_code == 401
    body = placement(url)
    assert [sum(map(len, layer)) for layer in body["replicas"]] == [EXPERTS + REDUNDANT] * LAYERS, body["replicas"]
    assert len(body["workers"]) == 2
    metrics = scrape(url + "/metrics")
    assert total(metrics, "expertmesh_expert_replicas") == LAYERS * (EXPERTS + REDUNDANT)
    assert max(by(metrics, "expertmesh_expert_replicas", "layer", "expert").values()) == 2
    deadline = time.monotonic() + 60
    while not body["controller_running"]:  # the controller's first tick
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
        body = placement(url)
    ctl = body["controller"]
    assert (ctl["rebalance"]["redundant_experts"], ctl["rebalance"]["interval_s"]) == (REDUNDANT, 5.0), ctl
    assert (ctl["autoscale"]["min_workers"], ctl["autoscale"]["max_workers"]) == (2, 3), ctl

    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120,
                   json={"model": "ck", "prompt": "Hot experts", "max_tokens": 8})
    assert r.status_code == 200, r.text
    queued = httpx.post(url + "/v1/admin/rebalance", headers=AUTH, timeout=30)
    assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
    waited = httpx.post(url + "/v1/admin/rebalance", headers=AUTH, json={"wait_s": 60}, timeout=90)
    assert waited.status_code == 200, waited.text
    result = waited.json()
    assert result["id"] == queued.json()["id"] + 1 and result["status"] in ("done", "skipped"), result
    assert result["reason"] == "requested" and len(result["imbalance_before"]) == LAYERS, result
    assert placement(url)["last_rebalance"]["id"] >= result["id"]
