"""Bring up expert workers and the router as Ray actors, each in its own placement group, and tear them down.

One single-bundle placement group per worker (and one for the router), so that a worker can be replaced or
added on its own: a placement group cannot grow, and a dead worker's group is freed with it. At start-up
`--pg-strategy` still decides where the groups go: they are placed one after the other, each with a soft
target node, the first group's node (PACK) or a node not used yet (SPREAD); the STRICT_ variants are checked.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.config import MixtralConfig
from protos.security import DataPlaneSecurity
from router.actor import RouterActor
from router.remote_experts import RoutingTable
from workers.actor import ExpertWorkerActor

from .actor_errors import startup_error
from .eplb import rebalance_experts
from .file_sd import file_sd_groups, write_file_sd
from .placement import PG_STRATEGIES, PlacementError, PlacementPlan, placement_bundles
from .ray_runtime import cluster_has_gpus, start_ray

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300
# Worker actors are named "expertmesh-<cluster>-<worker id>-<n>" in this namespace, so that tools outside the
# serve process (loadtest --kill-worker-every) find them through Ray.
WORKER_NAMESPACE = "expertmesh"


@dataclass(frozen=True)
class ClusterConfig:
    model_dir: str
    num_workers: int = 2
    dtype: str = "float32"
    placement: str = "contiguous"  # contiguous | round-robin
    pg_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    address: str | None = None  # None: embedded local Ray
    use_gpus: bool | None = None  # None: use GPUs when the cluster has them
    dispatch_timeout_s: float = 30.0  # Dispatch deadline: a worker that misses it is treated as dead
    worker_cpus: int = 1  # Ray CPUs (= torch threads) per expert worker
    router_cpus: int = 1  # Ray CPUs (= torch threads) of the router
    expert_metrics: bool = True  # workers export per-(layer, expert) series
    router_resource: str | None = None  # a custom Ray resource the router's bundle takes 1 of (pins it to a node)
    replace_timeout_s: float = 60.0  # a replacement worker's placement group must be placed within this
    bind_host: str = "0.0.0.0"  # workers' gRPC and metrics bind here; they advertise the node's IP
    security: DataPlaneSecurity | None = None  # the data plane's secret and TLS; None: a fresh secret
    redundant_experts: int = 0  # extra expert slots per layer from the start (EPLB on uniform load)


@dataclass
class WorkerSlot:
    """One expert worker: its id (kept across replacements), the (layer, expert) pairs it hosts, its actor,
    placement group and gRPC address."""

    worker_id: str
    pairs: list[tuple[int, int]]
    actor: object = None
    pg: object = None
    address: str = ""
    restarts: int = 0


class ExpertCluster:
    """Workers and the router actor, each in its own placement group; `shutdown` leaves nothing behind."""

    def __init__(self, cfg: ClusterConfig):
        if cfg.pg_strategy not in PG_STRATEGIES:
            raise PlacementError(f"placement group strategy: {cfg.pg_strategy!r} is not one of {PG_STRATEGIES}")
        self.cfg = cfg
        # Reaches the actors as constructor arguments only (never argv, env or logs; its repr hides it).
        self.security = cfg.security or DataPlaneSecurity.generate()
        model_cfg = MixtralConfig.from_file(cfg.model_dir)
        self.num_layers = model_cfg.num_hidden_layers
        self.plan = startup_plan(model_cfg.num_hidden_layers, model_cfg.num_local_experts, cfg)
        self.started_ray = not ray.is_initialized()
        start_ray(cfg.address, num_cpus_needed=cfg.num_workers * cfg.worker_cpus + cfg.router_cpus)
        self.use_gpus = cluster_has_gpus() if cfg.use_gpus is None else cfg.use_gpus
        self.slots: dict[str, WorkerSlot] = {}  # in worker order
        self.pending: WorkerSlot | None = None  # a requested worker: its group waits for a node, or it starts
        self._pending_address = None  # the pending worker's address() call, once started
        self.router = None
        self.router_pg = None
        self.file_sd_path: Path | None = None
        self._next_worker = cfg.num_workers
        self._cluster_id = uuid.uuid4().hex[:8]
        self._actors_started = 0
        self._lock = threading.Lock()  # replacements may run side by side (the controller's threads)
        try:
            for w in range(cfg.num_workers):
                self.slots[f"worker-{w}"] = WorkerSlot(f"worker-{w}", self.plan.pairs(w))
            self._place_startup_groups()
            for s in self.slots.values():
                s.actor = self._start_worker(s)
            try:
                self._await_addresses(list(self.slots.values()), READY_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:  # its own error, in one line
                raise startup_error(e) from None
            self.table = self.routing_table()
            self.router = self._start_router()
        except BaseException:  # an error, or Ctrl-C while starting: nothing was served, kill without a drain
            self.shutdown(graceful=False)
            raise

    # ---- placement groups ----------------------------------------------------------------------------------

    def _worker_bundle(self) -> dict[str, float]:
        return placement_bundles(1, self.use_gpus, self.cfg.worker_cpus, self.cfg.router_cpus)[0]

    def _router_bundle(self) -> dict[str, float]:
        bundle = placement_bundles(0, self.use_gpus, self.cfg.worker_cpus, self.cfg.router_cpus)[-1]
        if self.cfg.router_resource:  # e.g. KubeRay's head group offers {"expertmesh_router": 1}
            _check_router_resource(self.cfg.router_resource)
            bundle = {**bundle, self.cfg.router_resource: 1}
        return bundle

    def _place_startup_groups(self) -> None:
        """The workers' groups, then the router's (first when pinned), one after the other, spread or packed per
        --pg-strategy."""
        strategy = self.cfg.pg_strategy
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        used: list[str] = []
        workers, router = [(s, self._worker_bundle()) for s in self.slots.values()], [(None, self._router_bundle())]
        # a pinned router goes first: a worker placed on its node first could take the GPU the router needs there
        wanted = router + workers if self.cfg.router_resource else workers + router
        for slot, bundle in wanted:
            if "PACK" in strategy:
                target = used[0] if used else None
            else:
                target = next((n for n in nodes if n not in used), None)
            pg = self._new_pg(bundle, target)
            if slot is None:
                self.router_pg = pg
            else:
                slot.pg = pg
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
            used.append(placement_group_table(pg)["bundles_to_node_id"][0])
        distinct = len(set(used))
        if (strategy == "STRICT_PACK" and distinct > 1) or (strategy == "STRICT_SPREAD" and distinct < len(used)):
            raise PlacementError(f"--pg-strategy {strategy}: the cluster cannot place the {len(used)} bundles "
                                 f"that way (they landed on {distinct} nodes)")

    @staticmethod
    def _new_pg(bundle: dict[str, float], node_id: str | None = None):
        # A one-bundle STRICT_PACK group is any one node; the soft target is where the start-up strategy put it.
        return placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node_id)

    def placement_groups(self) -> list:
        return [s.pg for s in self.slots.values() if s.pg is not None] + ([self.router_pg] if self.router_pg else [])

    # ---- actors --------------------------------------------------------------------------------------------

    def _options(self, cls, pg, cpus: int, **named):
        return ray.remote(cls).options(
            num_cpus=cpus, num_gpus=1 if self.use_gpus else 0, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0), **named)

    def _start_worker(self, slot: WorkerSlot):
        with self._lock:
            self._actors_started += 1
            name = f"expertmesh-{self._cluster_id}-{slot.worker_id}-{self._actors_started}"
        return self._options(ExpertWorkerActor, slot.pg, self.cfg.worker_cpus, name=name,
                             namespace=WORKER_NAMESPACE).remote(
            self.cfg.model_dir, slot.pairs, self.cfg.dtype, slot.worker_id, host=self.cfg.bind_host,
            expert_metrics=self.cfg.expert_metrics, security=self.security)

    def _await_addresses(self, slots: list[WorkerSlot], timeout_s: float) -> None:
        addresses = ray.get([s.actor.address.remote() for s in slots], timeout=timeout_s)
        for s, addr in zip(slots, addresses, strict=True):
            s.address = addr

    def _start_router(self):
        router = self._options(RouterActor, self.router_pg, self.cfg.router_cpus).remote(
            self.cfg.model_dir, self.table, self.cfg.dtype, self.cfg.dispatch_timeout_s, security=self.security)
        ray.get(router.info.remote(), timeout=READY_TIMEOUT_S)
        return router

    @property
    def workers(self) -> list:
        """The worker actors, in worker order."""
        return [s.actor for s in self.slots.values()]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.slots.values()]

    def worker_ids(self) -> list[str]:
        return list(self.slots)

    def worker_pairs(self) -> list[list[tuple[int, int]]]:
        return [s.pairs for s in self.slots.values()]

    def worker_restarts(self) -> dict[str, int]:
        return {wid: s.restarts for wid, s in self.slots.items() if s.restarts}

    def worker_infos(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def routing_table(self) -> RoutingTable:
        return RoutingTable.from_pairs(self.worker_pairs(), self.addresses, self.worker_ids())

    # ---- changing the workers while serving ----------------------------------------------------------------

    def add_worker(self, pairs: list[tuple[int, int]], timeout_s: float | None = None) -> str:
        """Start a worker hosting `pairs` in its own placement group (on any node with capacity); returns its
        id. The router routes to it after push_table(). PlacementError when no node can take it in time."""
        wid = f"worker-{self._next_worker}"
        self._next_worker += 1
        slot = WorkerSlot(wid, sorted(map(tuple, pairs)))
        self._place_and_start(slot, timeout_s)
        self.slots[wid] = slot
        return wid

    def request_worker(self, pairs: list[tuple[int, int]], bundle: dict[str, float] | None = None) -> str:
        """Ask for a new worker's placement group and return at once: the group stays pending (the demand a
        cluster autoscaler such as KubeRay's sees) until a node can take it; `start_pending_worker` starts the
        worker then, `cancel_pending_worker` gives the group up. One at a time; returns the worker id to be."""
        if self.pending is not None:
            raise PlacementError(f"{self.pending.worker_id} is still waiting for a node")
        wid = f"worker-{self._next_worker}"
        self._next_worker += 1
        slot = WorkerSlot(wid, sorted(map(tuple, pairs)))
        slot.pg = self._new_pg(bundle or self._worker_bundle())
        self.pending = slot
        return wid

    def start_pending_worker(self) -> str | None:
        """Never waits: starts the pending worker once its group is placed, and once it serves adds it and
        returns its id (live in the router after push_table()); None meanwhile. Raises (and forgets the worker)
        when it failed to start."""
        slot = self.pending
        if slot is None:
            return None
        if slot.actor is None:
            # the GCS's own word (a fresh pg.ready() ref per call, waited on for 0 s, could miss a placed group)
            if placement_group_table(slot.pg).get("state") != "CREATED":
                return None
            slot.actor = self._start_worker(slot)
            self._pending_address = slot.actor.address.remote()
        if not ray.wait([self._pending_address], timeout=0)[0]:
            return None
        self.pending = None
        try:
            slot.address = ray.get(self._pending_address)
        except BaseException:
            self._stop_slot(slot, graceful=False)
            raise
        self.slots[slot.worker_id] = slot
        return slot.worker_id

    def cancel_pending_worker(self) -> str | None:
        """Give up the pending group (removed from Ray); returns the worker id it was for."""
        slot, self.pending = self.pending, None
        if slot is None:
            return None
        self._stop_slot(slot, graceful=False)
        return slot.worker_id

    def remove_worker(self, worker_id: str, graceful: bool = True) -> None:
        """Stop a worker and free its placement group; push a table without it first if it still serves."""
        slot = self.slots.pop(worker_id)
        self._stop_slot(slot, graceful)

    def replace_worker(self, worker_id: str, timeout_s: float | None = None) -> str:
        """Kill the worker (dead or hung) and start a new one, in a new placement group, loading exactly its
        pairs; returns the new address (live in the router after push_table()). PlacementError when no node
        has capacity within the timeout (the slot then has no actor; calling again retries)."""
        slot = self.slots[worker_id]
        self._stop_slot(slot, graceful=False)
        self._place_and_start(slot, timeout_s)
        slot.restarts += 1
        return slot.address

    def _place_and_start(self, slot: WorkerSlot, timeout_s: float | None) -> None:
        timeout = self.cfg.replace_timeout_s if timeout_s is None else timeout_s
        slot.pg = self._new_pg(self._worker_bundle())
        try:
            ray.get(slot.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            _quietly(lambda: remove_placement_group(slot.pg))
            slot.pg = None
            raise PlacementError(f"{slot.worker_id}: no node has {self._worker_bundle()} free for a new worker "
                                 f"within {timeout:g} s") from None
        slot.actor = self._start_worker(slot)
        try:
            self._await_addresses([slot], READY_TIMEOUT_S)
        except BaseException:
            self._stop_slot(slot, graceful=False)
            raise

    def _stop_slot(self, slot: WorkerSlot, graceful: bool) -> None:
        if slot.actor is not None:
            if graceful:
                _quietly(lambda: ray.get(slot.actor.stop.remote(), timeout=30))
            _quietly(lambda: ray.kill(slot.actor, no_restart=True))
            slot.actor = None
        if slot.pg is not None:
            _quietly(lambda: remove_placement_group(slot.pg))
            slot.pg = None
        slot.address = ""

    def push_table(self) -> RoutingTable:
        """Build the routing table from the current workers and swap it into the router (between two of its
        forwards); returns it."""
        self.table = self.routing_table()
        ray.get(self.router.swap_table.remote(self.table, self.worker_restarts()), timeout=60)
        return self.table

    def restart_router(self):
        """Replace a dead router actor (in its placement group, or a new one) with the current table; returns
        it. The caller starts its server."""
        _quietly(lambda: ray.kill(self.router, no_restart=True))
        if self.router_pg is None or placement_group_table(self.router_pg).get("state") == "REMOVED":
            self.router_pg = self._new_pg(self._router_bundle())
        ray.get(self.router_pg.ready(), timeout=READY_TIMEOUT_S)
        self.router = self._start_router()
        ray.get(self.router.swap_table.remote(self.table, self.worker_restarts()), timeout=60)
        return self.router

    # ---- Prometheus discovery ------------------------------------------------------------------------------

    def write_file_sd(self, path: str | Path) -> list[dict]:
        """Write the Prometheus file_sd targets (router HTTP port, each worker's metrics port) to path, and
        keep it current: refresh_file_sd rewrites it when they change. Returns the target groups."""
        self.file_sd_path = Path(path)
        return self.refresh_file_sd()

    def refresh_file_sd(self) -> list[dict]:
        """Rewrite the file_sd file (if one was asked for) when the targets changed; returns the groups."""
        router_url = ray.get(self.router.metrics_url.remote(), timeout=30) if self.router is not None else None
        infos = self.worker_infos()
        groups = file_sd_groups(router_url, [(i["worker_id"], i["metrics_url"]) for i in infos])
        if self.file_sd_path is not None:
            write_file_sd(self.file_sd_path, groups)
        return groups

    def shutdown(self, graceful: bool = True) -> None:
        """Stop gRPC servers gracefully (unless not `graceful`: an actor still starting would first finish
        starting), kill the actors, remove the placement groups (and Ray if we started it)."""
        if self.router is not None:
            if graceful:
                _quietly(lambda: ray.get(self.router.shutdown.remote(), timeout=30))
            _quietly(lambda: ray.kill(self.router))
            self.router = None
        self.cancel_pending_worker()
        for slot in list(self.slots.values()):
            self._stop_slot(slot, graceful)
        self.slots = {}
        if self.router_pg is not None:
            _quietly(lambda: remove_placement_group(self.router_pg))
            self.router_pg = None
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> ExpertCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def startup_plan(num_layers: int, num_experts: int, cfg: ClusterConfig) -> PlacementPlan:
    """--placement without redundant experts; with them, the EPLB plan for uniform load: num_experts +
    redundant_experts slots per layer from the start (as many as the workers can hold, one replica per worker)."""
    if not cfg.redundant_experts:
        return PlacementPlan.build(num_layers, num_experts, cfg.num_workers, cfg.placement)
    return rebalance_experts([[1.0] * num_experts] * num_layers, cfg.num_workers, cfg.redundant_experts)


def _check_router_resource(name: str) -> None:
    if ray.cluster_resources().get(name, 0) < 1:
        raise PlacementError(f"--router-resource {name}: no node of the Ray cluster offers it; start the node "
                             f"that should run the router with: ray start --resources '{{\"{name}\": 1}}'")


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - shutdown goes on past a dead actor
        log.warning("shutdown step failed: %s", e)
