"""The cluster controller: a thread in the serve process that keeps the expert plane whole.

Every tick it renews its lease on the router (while the lease holds, the router's engine holds steps that
hit a dead worker instead of failing them) and reads back the worker addresses the router marked down; it
pings every worker actor through Ray (an ActorDiedError is a dead worker, a ping unanswered for `hung_after_s`
a hung one); it replaces each failed worker (new actor, own placement group, exactly its experts) and swaps
the router's routing table; and it recreates the router actor when that died. When no node has room for a
replacement it tells the router to fail the held requests (recovery impossible) and tries again next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from .deployment import READY_TIMEOUT_S, ExpertCluster
from .placement import PlacementError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = 0.5  # between ticks
    lease_s: float = 10.0  # how long the router may count on a repair without hearing from us
    hung_after_s: float = 10.0  # an actor ping unanswered this long marks the worker hung (use the Dispatch deadline)
    router_call_timeout_s: float = 10.0  # a router that does not answer the heartbeat within this is left alone


class Controller:
    """Detects dead or hung workers and a dead router, and repairs them; `tick()` is one round (tests call it
    directly), `start()` runs it on a thread every `interval_s` until `stop()`."""

    def __init__(self, cluster: ExpertCluster, cfg: ControllerConfig | None = None,
                 start_server: Callable[[object], None] | None = None):
        self.cluster = cluster
        self.cfg = cfg or ControllerConfig()
        self.start_server = start_server  # called with a recreated router actor to start its HTTP server
        self.hooks: list[Callable[[Controller], None]] = []  # run at the end of each tick with a whole plane
        self.replacements = 0
        self.router_restarts = 0
        self.last_repair_s: float | None = None
        self._pings: dict[str, tuple[object, float]] = {}  # worker id -> (ping ref, sent at)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time

    def start(self) -> Controller:
        """One tick now (the router holds the lease from here on), then one every interval on a thread."""
        self.tick()
        self._thread = threading.Thread(target=self._run, name="expertmesh-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop ticking; a step the router still holds for a repair fails now (503) rather than at the lease's end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.cluster.router is not None:
            _call_router(self.cluster, "give_up", "the server is shutting down")

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.tick()
            except Exception:  # keep controlling: the next tick retries
                log.exception("controller tick failed")

    def tick(self) -> None:
        with self._lock:
            down = self._heartbeat(self.cfg.lease_s)
            failed = {**self._unresponsive_workers(), **down}
            if failed:
                self._repair(failed)
                return
            for hook in self.hooks:  # rebalance / autoscale (issue 13) decide here, on a whole plane
                hook(self)

    # ---- detection -----------------------------------------------------------------------------------------

    def _heartbeat(self, lease_s: float) -> dict[str, str]:
        """Renew the lease; {worker id: reason} for the addresses the router marked down. Recreates a dead
        router."""
        c = self.cluster
        try:
            state = ray.get(c.router.supervise.remote(lease_s), timeout=self.cfg.router_call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            log.warning("router did not answer the controller within %.0f s", self.cfg.router_call_timeout_s)
            return {}
        except ray.exceptions.RayActorError as e:
            self._restart_router(e)
            return {}
        by_address = {s.address: wid for wid, s in c.slots.items()}
        return {by_address[a]: f"router: {why}" for a, why in state["down"].items() if a in by_address}

    def _unresponsive_workers(self) -> dict[str, str]:
        """{worker id: reason} for workers whose actor died, never started, or leaves a ping unanswered."""
        now, failed = time.monotonic(), {}
        for wid, slot in self.cluster.slots.items():
            if slot.actor is None:
                failed[wid] = "no actor (an earlier replacement failed)"
            elif wid not in self._pings:
                self._pings[wid] = (slot.actor.ping.remote(), now)
        for wid in [w for w in self._pings if w not in self.cluster.slots or w in failed]:
            del self._pings[wid]
        if not self._pings:
            return failed
        refs = [ref for ref, _ in self._pings.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        for wid, (ref, sent) in list(self._pings.items()):
            if ref in ready:
                del self._pings[wid]
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    failed[wid] = f"actor died: {type(e).__name__}"
            elif now - sent > self.cfg.hung_after_s:
                del self._pings[wid]
                failed[wid] = f"hung: ping unanswered for {now - sent:.1f} s"
        return failed

    # ---- repair --------------------------------------------------------------------------------------------

    def _repair(self, failed: dict[str, str]) -> None:
        c = self.cluster
        t0 = time.monotonic()
        # a replacement can take up to its placement timeout plus an actor start: hold the router's lease that long
        self._heartbeat(c.cfg.replace_timeout_s + READY_TIMEOUT_S)
        for wid, reason in sorted(failed.items()):
            log.warning("expert worker %s (%s) failed: %s; replacing it", wid, c.slots[wid].address or "-", reason)
        with ThreadPoolExecutor(max_workers=len(failed)) as pool:  # several at once start side by side
            results = list(pool.map(self._replace, sorted(failed)))
        replaced = [(wid, address) for wid, address in results if address is not None]
        if replaced:
            c.push_table()
            self.replacements += len(replaced)
            self.last_repair_s = time.monotonic() - t0
            log.warning("expert plane repaired in %.2f s: %s", self.last_repair_s,
                        ", ".join(f"{w} now at {a}" for w, a in replaced))
        self._heartbeat(self.cfg.lease_s)

    def _replace(self, wid: str) -> tuple[str, str | None]:
        c = self.cluster
        try:
            address = c.replace_worker(wid)
        except PlacementError as e:
            log.error("cannot replace expert worker %s: %s", wid, e)
            _call_router(c, "give_up", f"cannot replace expert worker {wid}: {e}")
            return wid, None
        except ray.exceptions.RayError as e:  # the new actor died while starting: the next tick tries again
            log.error("replacement of expert worker %s failed: %s", wid, str(e).splitlines()[0])
            return wid, None
        self._pings.pop(wid, None)
        return wid, address

    def _restart_router(self, error: Exception) -> None:
        log.error("router actor died (%s); recreating it", type(error).__name__)
        t0 = time.monotonic()
        router = self.cluster.restart_router()
        if self.start_server is not None:
            self.start_server(router)
        self.router_restarts += 1
        log.warning("router recreated in %.2f s", time.monotonic() - t0)


def _call_router(cluster: ExpertCluster, method: str, *args) -> None:
    try:
        ray.get(getattr(cluster.router, method).remote(*args), timeout=30)
    except Exception as e:  # noqa: BLE001 - the next heartbeat finds a dead router
        log.warning("router %s failed: %s", method, e)
