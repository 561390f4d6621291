"""Live expert re-placement (and worker autoscaling) while serving, driven by the router's own load counters.

Every `tick()` (the serve controller calls it about once a second) polls the router actor: per-(layer, expert)
and per-(layer, worker) rows dispatched, Dispatch seconds per worker, the engine's queue, and pending
`POST /v1/admin/rebalance` requests. Each `interval_s` closes a window: when the worker imbalance (max / mean
rows of a layer's workers, the worst layer) stayed above `target_imbalance` for `windows_above` windows in a
row, it computes a new plan (cluster/eplb.py) from the window's load and applies it, make before break:
1. every worker loads the pairs it gains (it keeps serving meanwhile);
2. the router swaps its routing table between two forwards (a forward in flight finishes on the old one);
3. once no forward that started on the old table still runs (the router reports it: idle, or only forwards
   on the new table), workers drop the pairs they lost (and a removed worker stops). The rebalance waits up
   to `settle_s` for that; a forward still running on the old table then defers the drop to a later tick, and
   no other change starts before it is done. Nothing a forward can still route to is ever dropped, so no
   request fails or changes output.
With autoscaling, each window's LoadSignal (cluster/autoscale.py) may add a worker or remove one (taken out of
the table first, then stopped); both re-run the placement. A new worker's placement group is asked for without
waiting: it stays pending across ticks (the demand KubeRay's autoscaler turns into a node) and the first tick
that finds it placed starts the worker; a scale-down, or shutdown, while it waits gives the group up.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass

import ray

from .autoscale import AutoscaleConfig, Autoscaler, LoadSignal
from .eplb import layer_imbalance, rebalance_experts
from .placement import PlacementError, PlacementPlan, imbalance

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RebalanceConfig:
    redundant_experts: int = 0  # extra physical expert slots per layer
    target_imbalance: float = 1.2  # worker max / mean rows per layer to tolerate
    interval_s: float | None = None  # window length; None: rebalance only on request
    windows_above: int = 2  # windows in a row above target before acting
    min_window_tokens: int = 64  # rows dispatched in a window below which it says nothing
    min_gain: float = 0.05  # a new plan must lower the predicted worst-layer imbalance by this much
    settle_s: float = 2.0  # after the swap, wait this long for old-table forwards to end, else drop on a later tick

    def validate(self, num_experts: int) -> None:
        if not isinstance(self.redundant_experts, int) or self.redundant_experts < 0:
            raise PlacementError(f"--redundant-experts: must be an integer >= 0, got {self.redundant_experts!r}")
        if not self.target_imbalance >= 1.0:
            raise PlacementError(f"--target-imbalance: must be >= 1.0 (max / mean worker load), "
                                 f"got {self.target_imbalance}")
        if self.interval_s is not None and not self.interval_s > 0:
            raise PlacementError(f"--rebalance-interval: must be > 0 seconds, got {self.interval_s}")
        if self.windows_above < 1:
            raise PlacementError(f"windows_above: must be >= 1, got {self.windows_above}")


@dataclass(frozen=True)
class PendingDrop:
    """The break half of a change, done once no forward on the old table runs."""

    lose: dict[str, list[tuple[int, int]]]  # worker id -> pairs to drop
    remove: str | None  # a worker to stop (out of the table since the swap)
    reason: str


@dataclass(frozen=True)
class Window:
    """Load measured between two polls of the router."""

    seconds: float
    expert_load: list[list[int]]  # [layer][expert] rows
    worker_tokens: dict[tuple[int, str], int]  # (layer, address) -> rows
    worker_seconds: dict[str, float]  # address -> Dispatch seconds
    dispatch_seconds: float
    waiting: int

    @property
    def tokens(self) -> int:
        return sum(map(sum, self.expert_load))

    def worker_imbalance(self, serving: dict[int, list[str]]) -> list[float]:
        """Per layer: max / mean rows over the workers that serve it (`serving`: layer -> addresses)."""
        return [imbalance([float(self.worker_tokens.get((layer, a), 0)) for a in addrs])
                for layer, addrs in sorted(serving.items())]


def window_between(a: dict, b: dict) -> Window:
    """The Window from poll `a` to the later poll `b` (both from RouterActor.placement_poll)."""
    la, lb = a["load"], b["load"]
    expert = [[y - x for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(la["expert_tokens"],
                                                                            lb["expert_tokens"], strict=True)]
    before = {(layer, addr): n for layer, addr, n in la["worker_tokens"]}
    worker = {(layer, addr): n - before.get((layer, addr), 0) for layer, addr, n in lb["worker_tokens"]}
    secs = {addr: s - la["worker_seconds"].get(addr, 0.0) for addr, s in lb["worker_seconds"].items()}
    engine = b.get("engine") or {}
    return Window(seconds=max(lb["time"] - la["time"], 1e-9), expert_load=expert, worker_tokens=worker,
                  worker_seconds=secs, dispatch_seconds=b["dispatch_wall_seconds"] - a["dispatch_wall_seconds"],
                  waiting=int(engine.get("num_waiting", 0)))


class Rebalancer:
    """Runs in the serve driver next to the failover controller (same thread: no two changes at once)."""

    def __init__(self, cluster, cfg: RebalanceConfig, autoscale: AutoscaleConfig | None = None):
        self.cluster, self.cfg = cluster, cfg
        self.autoscaler = Autoscaler(autoscale) if autoscale is not None else None
        self.rebalances = 0
        self.windows_above = 0
        self.last_window: Window | None = None  # the last closed window with enough tokens to judge
        self.last_imbalance: list[float] = []
        self._start: dict | None = None  # poll at the start of the current window
        self._results: list[dict] = []  # to report on the next poll
        self.history: deque[dict] = deque(maxlen=64)  # every result, newest last
        self.pending_drop: PendingDrop | None = None  # the break half of the last change, until safe
        self._pending_up = ("", 0.0)  # (reason, when asked) of the worker requested from Ray

    @property
    def router(self):
        return self.cluster.router

    def _serving(self) -> dict[int, list[str]]:
        by_layer: dict[int, set[str]] = {}
        for (layer, _), addrs in self.cluster.table.replicas.items():
            by_layer.setdefault(layer, set()).update(addrs)
        return {layer: sorted(a) for layer, a in by_layer.items()}

    # ---- the controller's tick -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[dict]:
        """Poll the router, act on requests and closed windows, report; returns what it did this tick."""
        now = time.monotonic() if now is None else now
        poll = ray.get(self.router.placement_poll.remote(), timeout=CALL_TIMEOUT_S)
        if self.pending_drop is not None and poll.get("old_table_forwards", 0) == 0:
            self._finish_drop()
        done: list[dict] = []
        if self._start is None or poll["load"]["rpcs"] < self._start["load"]["rpcs"]:  # (a new router)
            self._start = poll
        window = window_between(self._start, poll)
        if self.cluster.pending is not None:
            done += self._join_pending(window)
        for req in poll["requests"]:  # manual: use what the current window (or the last one) measured
            done.append(self.rebalance(self._load(window), reason="requested", request_id=req["id"], force=True))
        if self.cfg.interval_s is not None and window.seconds >= self.cfg.interval_s:
            done += self._close_window(window, now)
            self._start = poll
        if any(r["status"] == "done" for r in done):
            self._start = None  # the next window starts on the new placement
        self._results += done
        self.history.extend(done)
        self._report()
        return done

    def _load(self, window: Window) -> Window:
        """The window to plan from: this one if it saw enough tokens, else the last one that did."""
        if window.tokens >= self.cfg.min_window_tokens or self.last_window is None:
            return window
        return self.last_window

    def _close_window(self, window: Window, now: float) -> list[dict]:
        done: list[dict] = []
        if window.tokens >= self.cfg.min_window_tokens:
            self.last_window = window
            self.last_imbalance = window.worker_imbalance(self._serving())
            above = max(self.last_imbalance, default=1.0) > self.cfg.target_imbalance
            self.windows_above = self.windows_above + 1 if above else 0
        else:
            self.windows_above = 0
        if self.autoscaler is not None:
            change = self._autoscale(window, now)
            if change is not None:
                self.windows_above = 0
                return [change]
        if self.windows_above >= self.cfg.windows_above:
            self.windows_above = 0
            done.append(self.rebalance(window, reason=f"imbalance above {self.cfg.target_imbalance:g}"))
        return done

    def _autoscale(self, window: Window, now: float) -> dict | None:
        names = dict(zip(self.cluster.addresses, self.cluster.worker_ids(), strict=True))
        signal = LoadSignal(seconds=window.seconds, expert_share=min(1.0, window.dispatch_seconds / window.seconds),
                            worker_busy={names[a]: min(1.0, window.worker_seconds.get(a, 0.0) / window.seconds)
                                         for a in self.cluster.addresses if a},
                            waiting=window.waiting)
        pending = self.cluster.pending
        delta, why = self.autoscaler.decide(signal, len(self.cluster.worker_ids()) + (pending is not None), now)
        if pending is not None and delta < 0:  # not placed yet: give the group up instead of a serving worker
            wid = self.cluster.cancel_pending_worker()
            log.info("autoscale: gave up the pending %s (%s)", wid, why)
            return {"id": None, "status": "cancelled", "reason": f"scale down: {why}", "worker": wid}
        if not delta or pending is not None:
            return None
        return self.scale(delta, self._load(window), reason=why)

    # ---- changing the placement ------------------------------------------------------------------------------

    def rebalance(self, window: Window, reason: str, request_id: int | None = None, force: bool = False) -> dict:
        """Re-place the experts over the current workers for the window's load."""
        if not self._settled():
            return self._busy(reason, request_id)
        ids = self.cluster.worker_ids()
        return self._replace(window, ids, self.cluster.worker_pairs(), reason, request_id, force)

    def scale(self, delta: int, window: Window, reason: str) -> dict:
        """Add (+1) or remove (-1) one worker and re-place the experts over the new set."""
        if not self._settled():
            return self._busy(f"scale {'up' if delta > 0 else 'down'}: {reason}", None)
        ids, pairs = self.cluster.worker_ids(), self.cluster.worker_pairs()
        t0 = time.monotonic()
        before = self._model_imbalance(pairs, window)
        if delta > 0:  # ask for the worker's group; a later tick starts it once a node takes it
            plan = self._plan(window, len(ids) + 1, pairs + [[]])
            wid = self.cluster.request_worker(plan.pairs(len(ids)))
            self._pending_up = (f"scale up: {reason}", time.monotonic())
            log.info("autoscale: asked for %s (%s); it starts once its placement group is placed", wid, reason)
            return {"id": None, "status": "pending", "reason": f"scale up: {reason}", "worker": wid,
                    "message": "the new worker's placement group waits for a node"}
        else:
            victim = ids[-1]  # the newest worker
            plan = self._plan(window, len(ids) - 1, pairs[:-1])
            result = self._apply(plan, ids[:-1], window, before, f"scale down: {reason}", None, t0, remove=victim)
        if self.autoscaler is not None:
            self.autoscaler.note_change(time.monotonic())
        return result

    def _join_pending(self, window: Window) -> list[dict]:
        """Start the requested worker once its group is placed (never waits for a node) and re-place with it."""
        if self.pending_drop is not None:  # the tick finishes it once the router reports no old forward
            return []
        try:
            wid = self.cluster.start_pending_worker()
        except Exception as e:  # noqa: BLE001 - the worker failed to start; a later overloaded window asks again
            log.warning("autoscale: the new worker failed to start: %s", e)
            return [{"id": None, "status": "failed", "reason": self._pending_up[0], "message": str(e)}]
        if wid is None:
            return []
        reason, asked = self._pending_up
        t0 = time.monotonic()
        log.info("autoscale: added %s (%s) %.1f s after asking", wid, reason, t0 - asked)
        ids, pairs = self.cluster.worker_ids(), self.cluster.worker_pairs()
        window = self._load(window)
        result = self._apply(self._plan(window, len(ids), pairs), ids, window,
                             self._model_imbalance(pairs[:-1], window), reason, None, t0)
        if self.autoscaler is not None:
            self.autoscaler.note_change(time.monotonic())
        return [result]

    def _plan(self, window: Window, num_workers: int, current: list) -> PlacementPlan:
        return rebalance_experts(window.expert_load, num_workers, self.cfg.redundant_experts, current)

    def _model_imbalance(self, pairs: list, window: Window) -> list[float]:
        """Per layer: the worker imbalance the placement `pairs` gives the window's load (rows split evenly)."""
        shape = self.cluster.plan
        plan = PlacementPlan.from_worker_pairs(shape.num_layers, shape.num_experts, pairs)
        return layer_imbalance(plan, window.expert_load)

    def _replace(self, window: Window, ids: list[str], pairs: list, reason: str, request_id: int | None,
                 force: bool) -> dict:
        t0 = time.monotonic()
        plan = self._plan(window, len(ids), pairs)
        before, after = self._model_imbalance(pairs, window), layer_imbalance(plan, window.expert_load)
        if plan.all_pairs() == [sorted(p) for p in pairs] or (
                not force and max(after) > max(before) - self.cfg.min_gain):
            return {"id": request_id, "status": "skipped", "reason": reason,
                    "message": "no placement is better for this load", "imbalance_before": _r(before),
                    "imbalance_after": _r(after), "window_tokens": window.tokens}
        return self._apply(plan, ids, window, before, reason, request_id, t0)

    def _apply(self, plan: PlacementPlan, ids: list[str], window: Window, before: list[float], reason: str,
               request_id: int | None, t0: float, remove: str | None = None) -> dict:
        """Make before break: load, swap, drop (and stop `remove`, taken out of the table with the swap)."""
        slots = self.cluster.slots
        old = {wid: list(slots[wid].pairs) for wid in ids}
        new = dict(zip(ids, plan.all_pairs(), strict=True))
        gain = {w: sorted(set(new[w]) - set(old[w])) for w in ids}
        lose = {w: sorted(set(old[w]) - set(new[w])) for w in ids}
        measured_before = window.worker_imbalance(self._serving()) if window.tokens else []
        try:
            ray.get([slots[w].actor.add_experts.remote(gain[w]) for w in ids if gain[w]], timeout=CALL_TIMEOUT_S)
        except Exception as e:  # a worker died or a load failed: nothing routes to the new pairs yet
            log.warning("rebalance (%s) aborted while loading: %s", reason, e)
            return {"id": request_id, "status": "failed", "reason": reason, "message": f"loading failed: {e}"}
        for w in ids:
            slots[w].pairs = new[w]
        if remove is not None:
            slots[remove].pairs = []  # out of the routing table with this swap, stopped after it
        self.cluster.push_table()
        self.pending_drop = PendingDrop({w: lose[w] for w in ids if lose[w]}, remove, reason)
        settled = self._settled()
        if not settled:
            log.info("rebalance (%s): a forward started on the old table still runs; dropping on a later tick",
                     reason)
        self.rebalances += 1
        after = layer_imbalance(plan, window.expert_load)
        moved = sum(len(g) for g in gain.values())
        result = {"id": request_id, "status": "done", "reason": reason, "imbalance_before": _r(before),
                  "imbalance_before_measured": _r(measured_before), "imbalance_after": _r(after),
                  "pairs_loaded": moved, "pairs_dropped": sum(len(x) for x in lose.values()),
                  "replicas": plan.replica_counts(), "workers": len(ids), "dropped_now": settled,
                  "seconds": round(time.monotonic() - t0, 3), "window_tokens": window.tokens}
        log.info("rebalance %d (%s): worker imbalance per layer before %s after %s (predicted), %d pairs loaded, "
                 "%d dropped, %d workers, %.2f s", self.rebalances, reason, _r(before), _r(after), moved,
                 result["pairs_dropped"], len(ids), result["seconds"])
        return result

    def _settled(self) -> bool:
        """Finish the last change's drop once no forward on the old table runs (waits up to settle_s); True when
        nothing is left to drop."""
        if self.pending_drop is None:
            return True
        if ray.get(self.router.wait_old_forwards.remote(self.cfg.settle_s), timeout=CALL_TIMEOUT_S):
            self._finish_drop()
        return self.pending_drop is None

    def _finish_drop(self) -> None:
        """Workers drop the pairs they lost (and a removed worker stops): no forward can route to them now."""
        drop, self.pending_drop = self.pending_drop, None
        slots = self.cluster.slots
        for w, pairs in drop.lose.items():
            if w not in slots or slots[w].actor is None:
                continue  # removed or being replaced (a replacement loads only its pairs)
            try:
                ray.get(slots[w].actor.drop_experts.remote(pairs), timeout=CALL_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a dead worker is the failover controller's to replace
                log.warning("rebalance (%s): %s could not drop %d pairs: %s", drop.reason, w, len(pairs), e)
        if drop.remove is not None and drop.remove in slots:
            self.cluster.remove_worker(drop.remove)

    def _busy(self, reason: str, request_id: int | None) -> dict:
        return {"id": request_id, "status": "skipped", "reason": reason,
                "message": "the last change still waits for a forward on the old routing table to end"}

    def _report(self) -> None:
        status = {"rebalance": asdict(self.cfg), "rebalances": self.rebalances,
                  "window_imbalance": _r(self.last_imbalance), "windows_above": self.windows_above,
                  "workers": len(self.cluster.worker_ids())}
        if self.cluster.pending is not None:
            status["pending_worker"] = {"worker": self.cluster.pending.worker_id, "reason": self._pending_up[0],
                                        "waiting_s": round(time.monotonic() - self._pending_up[1], 1)}
        if self.autoscaler is not None:
            status["autoscale"] = {**asdict(self.autoscaler.cfg), "last_decision": self.autoscaler.last_decision}
        results, self._results = self._results, []
        ray.get(self.router.placement_report.remote(status, results), timeout=CALL_TIMEOUT_S)


def _r(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]
