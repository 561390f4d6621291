"""Live re-placement and autoscaling with real Ray: a skewed checkpoint served by 4 workers under load, the
controller replicates the hot experts, scales up under overload and down when idle; no request fails and
greedy text never changes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.autoscale import AutoscaleConfig
from cluster.controller import Controller
from cluster.deployment import ClusterConfig, ExpertCluster
from cluster.placement import PlacementPlan
from cluster.rebalance import RebalanceConfig, Rebalancer, Window, window_between
from cluster.rebalance_flags import PlacementSettings, attach
from model.random_checkpoint import write_checkpoint
from router.remote_experts import split_rows
from router.scheduler import EngineConfig
from router.server import ServerConfig
from tests.scrape import by, scrape, total

KEY = "test-key"
PROMPTS = [f"The {w} of expert number {i}" for i, w in enumerate(["load", "story", "heat", "tale", "shape", "map"])]
MAX_TOKENS = 12
LAYERS, EXPERTS, REDUNDANT = 2, 8, 4
DEADLINE_S = 240.0


def call(url: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def complete(url: str, prompt: str) -> str:
    status, body = call(url, "/v1/completions", {"model": "ck", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "ignore_eos": True})
    if status != 200:
        raise RuntimeError(f"{status}: {body}")
    return body["choices"][0]["text"]


def wait_for(cond, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Load:
    """Client threads sending greedy completions and checking each text against the reference."""

    def __init__(self, url: str, reference: dict[str, str], clients: int):
        self.url, self.reference = url, reference
        self.stop, self.done, self.errors, self.mismatches = threading.Event(), 0, [], []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                text = complete(self.url, prompt)
            except Exception as e:  # noqa: BLE001 - counted and reported by the test
                self.errors.append(repr(e))
                continue
            self.done += 1
            if text != self.reference[prompt]:
                self.mismatches.append((prompt, text))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("rebalance") / "ck"
    write_checkpoint(d, "tiny", seed=0, router_skew=1.2)
    with ExpertCluster(ClusterConfig(str(d), 4)) as cluster:
        cfg = ServerConfig(port=0, api_key=KEY, engine=EngineConfig(num_kv_blocks=256, max_num_seqs=4))
        url = ray.get(cluster.router.start_server.remote(cfg))
        reference = {p: complete(url, p) for p in PROMPTS}
        yield cluster, url, reference


def measured_imbalance(cluster: ExpertCluster, seconds: float) -> tuple[list[float], list[list[int]]]:
    a = ray.get(cluster.router.placement_poll.remote())
    time.sleep(seconds)
    w = window_between(a, ray.get(cluster.router.placement_poll.remote()))
    assert min(map(sum, w.expert_load)) >= 200, f"too few rows in the window to judge: {w.expert_load}"
    serving: dict[int, set[str]] = {}
    for (layer, _), addrs in cluster.table.replicas.items():
        serving.setdefault(layer, set()).update(addrs)
    return w.worker_imbalance({k: sorted(v) for k, v in serving.items()}), w.expert_load


def test_admin_endpoints_need_the_key_and_a_controller(served):
    cluster, url, _ = served
    assert call(url, "/v1/admin/placement", key=None)[0] == 401
    status, body = call(url, "/v1/admin/placement")
    assert status == 200 and len(body["workers"]) == 4 and not body["controller_running"]
    assert [len(r) for r in body["replicas"][0]] == [1] * EXPERTS
    status, body = call(url, "/v1/admin/rebalance", {})
    assert status == 503 and "no placement controller" in body["error"]["message"]
    status, body = call(url, "/v1/admin/rebalance", {"wait_s": -1})
    assert status == 400 and body["error"]["param"] == "wait_s"


def test_replicas_rebalance_and_autoscale_under_load(served, caplog):
    cluster, url, reference = served
    # What `serve --redundant-experts 4 --autoscale --min-workers 3 --max-workers 5` runs, with short windows;
    # the autoscaler needs 3 overloaded windows, so the skew (2 windows above 1.2) triggers a rebalance first.
    controller = Controller(cluster).start()
    rb = attach(controller, cluster, PlacementSettings(
        RebalanceConfig(redundant_experts=REDUNDANT, interval_s=2.5),
        AutoscaleConfig(min_workers=3, max_workers=5, up_windows=3, idle_s=3.0, cooldown_s=2.0)))
    rebalance_log = logging.getLogger("cluster.rebalance")
    rebalance_log.addHandler(caplog.handler)
    try:
        with Load(url, reference, clients=10) as load:
            wait_for(lambda: any(r["status"] == "done" and r["reason"] == "imbalance above 1.2" for r in rb.history),
                     "a rebalance triggered by the skew")
            # Overloaded (4 sequences at most, 10 clients): a worker is added, placed with replicas.
            wait_for(lambda: len(cluster.worker_ids()) == 5, "scale up to --max-workers 5")
            wait_for(lambda: any(r["status"] == "done" and r["reason"].startswith("scale up") for r in rb.history),
                     "the re-placement over the added worker")
            changes = len(rb.history)
            imbalance, load_seen = measured_imbalance(cluster, 4.0)
            replicas = {k: len(v) for k, v in cluster.table.replicas.items()}
            status, placement = call(url, "/v1/admin/placement")
            status_post, posted = call(url, "/v1/admin/rebalance", {"wait_s": 60})
            metrics = scrape(url + "/metrics")
        assert load.errors == [] and load.mismatches == [] and load.done > 0
        print(f"requests {load.done}, results {list(rb.history)[:changes]}, imbalance {imbalance}")
        assert max(imbalance) <= 1.3, imbalance
        for layer, row in enumerate(load_seen):
            hot = max(range(EXPERTS), key=row.__getitem__)
            assert replicas[(layer, hot)] >= 2, (layer, hot, replicas)
            assert sum(replicas[(layer, e)] for e in range(EXPERTS)) == EXPERTS + REDUNDANT
        assert status == 200 and placement["controller_running"] and placement["rebalances_total"] >= 1
        assert len(placement["workers"]) == 5 and placement["controller"]["autoscale"]["max_workers"] == 5
        assert status_post == 200 and posted["status"] in ("done", "skipped") and posted["id"] >= 1
        assert total(metrics, "expertmesh_workers") == 5
        assert total(metrics, "expertmesh_rebalances_total") >= 1
        assert total(metrics, "expertmesh_expert_replicas") == LAYERS * (EXPERTS + REDUNDANT)
        assert max(by(metrics, "expertmesh_expert_replicas", "layer", "expert").values()) >= 2

        # Idle: one worker removed per idle window, down to --min-workers 3 (each change re-places).
        wait_for(lambda: len(cluster.worker_ids()) == 3, "scale down to --min-workers 3")
    finally:
        controller.stop()
        rebalance_log.removeHandler(caplog.handler)
    assert controller.replacements == 0
    skew = next(r for r in rb.history if r["reason"] == "imbalance above 1.2")
    assert max(skew["imbalance_before_measured"]) > 1.2 and max(skew["imbalance_after"]) <= 1.3, skew
    lines = [m.getMessage() for m in caplog.records if m.name == "cluster.rebalance"]
    one = [x for x in lines if re.fullmatch(r"rebalance \d+ \(imbalance above 1\.2\): worker imbalance per layer "
                                            r"before \[[\d., ]+\] after \[[\d., ]+\] \(predicted\), .*", x)]
    assert len(one) == sum(r["status"] == "done" and r["reason"] == "imbalance above 1.2" for r in rb.history) >= 1
    assert [complete(url, p) for p in PROMPTS] == [reference[p] for p in PROMPTS]
    infos = cluster.worker_infos()
    assert len(infos) == 3 and all(len(i["pairs"]) >= 1 for i in infos)
    hosted = sorted(tuple(p) for i in infos for p in i["pairs"])
    assert hosted == sorted(p for k, v in cluster.table.replicas.items() for p in [k] * len(v))


def timed_tick(rb: Rebalancer) -> list[dict]:
    t0 = time.monotonic()
    done = rb.tick()
    assert time.monotonic() - t0 < 3.0, "a tick waited for the pending placement group"
    return done


def test_a_scale_up_no_node_can_take_stays_pending_without_blocking(served):
    """The new worker's placement group waits across ticks (the demand a cluster autoscaler sees), is given up by
    a scale-down, and once a node has room the worker starts and joins the placement."""
    cluster, url, reference = served
    before = cluster.worker_ids()
    free = ray.available_resources().get("CPU", 0)
    full = placement_group([{"CPU": free}]) if free else None  # what other jobs would hold on a busy node
    if full is not None:
        ray.get(full.ready(), timeout=60)
    autoscale = AutoscaleConfig(min_workers=1, max_workers=len(before) + 1, idle_s=0.0, cooldown_s=0.0)
    idle = Rebalancer(cluster, RebalanceConfig(interval_s=0.5), autoscale)  # its idle windows scale down
    manual = Rebalancer(cluster, RebalanceConfig(), autoscale)  # no windows: only joins the pending worker
    load = Window(1.0, [[1] * EXPERTS] * LAYERS, {}, {}, 0.0, 0)
    try:
        asked = manual.scale(+1, load, "test")
        assert asked["status"] == "pending" and cluster.pending is not None, asked
        pg = cluster.pending.pg
        for _ in range(3):
            assert timed_tick(manual) == [] and placement_group_table(pg)["state"] == "PENDING"
        status, body = call(url, "/v1/admin/placement")
        assert body["controller"]["pending_worker"]["worker"] == asked["worker"], body["controller"]
        wait_for(lambda: any(r["status"] == "cancelled" for r in timed_tick(idle)), "the idle scale-down", 30)
        assert cluster.pending is None and placement_group_table(pg)["state"] == "REMOVED"
        assert cluster.worker_ids() == before

        asked = manual.scale(+1, load, "test")
        assert asked["status"] == "pending"
        if full is not None:
            remove_placement_group(full)
            full = None
        wait_for(lambda: any(r["status"] == "done" for r in timed_tick(manual)), "the worker to join", 120)
        assert cluster.pending is None and len(cluster.worker_ids()) == len(before) + 1
        assert complete(url, PROMPTS[0]) == reference[PROMPTS[0]]
    finally:
        if full is not None:
            remove_placement_group(full)
        cluster.cancel_pending_worker()


def test_a_forward_still_on_the_old_table_defers_the_drop(served):
    """A request's forward held (its worker SIGSTOPped) across a swap that moves a pair: the pair stays loaded on
    its old worker, through ticks, until that forward ended; the request's text is unchanged."""
    cluster, url, reference = served
    ids = cluster.worker_ids()
    a, b, held = ids[0], ids[1], ids[-1]
    pairs = {w: list(cluster.slots[w].pairs) for w in ids}
    moved = next(p for p in pairs[a] if p not in pairs[b])
    pairs[a].remove(moved)
    pairs[b] = sorted(pairs[b] + [moved])
    plan = PlacementPlan.from_worker_pairs(LAYERS, EXPERTS, [pairs[w] for w in ids])
    rb = Rebalancer(cluster, RebalanceConfig(settle_s=0.5))
    load = Window(1.0, [[1] * EXPERTS] * LAYERS, {}, {}, 0.0, 0)
    pid = ray.get(cluster.slots[held].actor.info.remote())["pid"]
    out: list[str] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        request = threading.Thread(target=lambda: out.append(complete(url, PROMPTS[1])))
        request.start()
        time.sleep(1.5)
        assert request.is_alive(), "the request did not wait for the stopped worker"
        result = rb._apply(plan, ids, load, [1.0] * LAYERS, "test", None, time.monotonic())
        assert result["status"] == "done" and not result["dropped_now"], result
        for _ in range(2):
            rb.tick()
        assert rb.pending_drop is not None and moved in hosted(cluster, a)
        assert rb.rebalance(load, "requested", force=True)["status"] == "skipped"  # no change before the drop
    finally:
        os.kill(pid, signal.SIGCONT)
    request.join(60)
    assert out == [reference[PROMPTS[1]]]
    wait_for(lambda: rb.tick() == [] and rb.pending_drop is None, "the deferred drop", 30)
    assert moved not in hosted(cluster, a) and moved in hosted(cluster, b)


def hosted(cluster: ExpertCluster, worker_id: str) -> list[tuple[int, int]]:
    return [tuple(p) for p in ray.get(cluster.slots[worker_id].actor.info.remote(), timeout=30)["pairs"]]


def test_the_rounding_remainder_rotates_over_replicas():
    """A decode step sends a hot expert a few rows: the leftover row must not always go to one replica."""
    got = [split_rows(0, 1, ["a", "b", "c"], rotate=r) for r in range(3)]
    assert sorted(g[0][0] for g in got) == ["a", "b", "c"] and all(g[0][1:] == (0, 1) for g in got)
    assert split_rows(4, 7, ["a", "b"], rotate=1) == [("b", 4, 3), ("a", 7, 4)]
