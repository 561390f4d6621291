"""Worker autoscaling from live load: when to add an expert worker and when to remove one.

The signal, measured by the router over one controller window (cluster/rebalance.py computes it):
- expert share: seconds the router spent inside expert dispatch (wire plus worker compute, slowest worker per
  layer) over the window's wall seconds. While requests are queued the engine steps back to back, so this is
  the part of the step the experts take;
- worker busy: per worker, the seconds its Dispatch RPCs took as the router saw them, over the window;
- queue: requests waiting to be scheduled at the end of the window (the engine is at capacity).
Scale up (+1) when, for `up_windows` windows in a row, the expert share is at least `up_expert_share`, every
worker is busy at least `up_worker_busy` of the time and requests are waiting. Scale down (-1) after `idle_s`
seconds in which the expert share stayed below `idle_expert_share` and nothing waited. Never outside
[min_workers, max_workers], and not within `cooldown_s` of the last change.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class AutoscaleConfigError(ValueError):
    """An autoscaling setting that cannot work; names the flag."""


@dataclass(frozen=True)
class AutoscaleConfig:
    min_workers: int = 1
    max_workers: int = 8
    up_expert_share: float = 0.5
    up_worker_busy: float = 0.3
    up_windows: int = 2
    idle_expert_share: float = 0.05
    idle_s: float = 60.0
    cooldown_s: float = 10.0

    def validate(self, start_workers: int, slots_per_layer: int) -> None:
        if self.min_workers < 1:
            raise AutoscaleConfigError(f"--min-workers: must be at least 1, got {self.min_workers}")
        if self.max_workers < self.min_workers:
            raise AutoscaleConfigError(f"--max-workers ({self.max_workers}) is below --min-workers "
                                       f"({self.min_workers})")
        if not self.min_workers <= start_workers <= self.max_workers:
            raise AutoscaleConfigError(f"--workers {start_workers} is outside [--min-workers {self.min_workers}, "
                                       f"--max-workers {self.max_workers}]")
        if self.max_workers > slots_per_layer:
            raise AutoscaleConfigError(f"--max-workers {self.max_workers}: only {slots_per_layer} expert slots per "
                                       f"layer (experts + --redundant-experts); every worker needs one")
        for name in ("up_expert_share", "up_worker_busy", "idle_expert_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise AutoscaleConfigError(f"autoscale {name}: must be in [0, 1], got {getattr(self, name)}")
        if self.up_windows < 1 or self.idle_s < 0 or self.cooldown_s < 0:
            raise AutoscaleConfigError("autoscale: up_windows must be >= 1, idle_s and cooldown_s >= 0")


@dataclass(frozen=True)
class LoadSignal:
    """One window of measured load."""

    seconds: float
    expert_share: float
    worker_busy: dict[str, float] = field(default_factory=dict)  # worker id -> busy fraction
    waiting: int = 0

    def overloaded(self, cfg: AutoscaleConfig) -> bool:
        return (self.expert_share >= cfg.up_expert_share and self.waiting > 0 and bool(self.worker_busy)
                and min(self.worker_busy.values()) >= cfg.up_worker_busy)

    def idle(self, cfg: AutoscaleConfig) -> bool:
        return self.expert_share < cfg.idle_expert_share and self.waiting == 0


class Autoscaler:
    """Turns a stream of LoadSignals into +1 / 0 / -1 worker decisions (with the reason)."""

    def __init__(self, cfg: AutoscaleConfig):
        self.cfg = cfg
        self.up_streak = 0
        self.idle_since: float | None = None
        self.last_change = float("-inf")
        self.last_decision = "none yet"

    def decide(self, signal: LoadSignal, num_workers: int, now: float) -> tuple[int, str]:
        cfg = self.cfg
        self.up_streak = self.up_streak + 1 if signal.overloaded(cfg) else 0
        if signal.idle(cfg):
            self.idle_since = now - signal.seconds if self.idle_since is None else self.idle_since
        else:
            self.idle_since = None
        delta, why = 0, ""
        if num_workers < cfg.min_workers:
            delta, why = 1, f"below --min-workers {cfg.min_workers}"
        elif num_workers > cfg.max_workers:
            delta, why = -1, f"above --max-workers {cfg.max_workers}"
        elif now - self.last_change < cfg.cooldown_s:
            return 0, "cooling down"
        elif self.up_streak >= cfg.up_windows and num_workers < cfg.max_workers:
            busy = min(signal.worker_busy.values())
            delta, why = 1, (f"overloaded for {self.up_streak} windows: expert share {signal.expert_share:.2f}, "
                             f"least busy worker {busy:.2f}, {signal.waiting} waiting")
        elif (self.idle_since is not None and now - self.idle_since >= cfg.idle_s
              and num_workers > cfg.min_workers):
            delta, why = -1, f"idle for {now - self.idle_since:.0f} s (expert share {signal.expert_share:.2f})"
        if delta:
            self.note_change(now)
            self.last_decision = f"{'+1' if delta > 0 else '-1'} worker: {why}"
        return delta, why

    def note_change(self, now: float) -> None:
        """Any change of the workers (ours or a rebalance) restarts the streaks and the cooldown."""
        self.last_change = now
        self.up_streak = 0
        self.idle_since = None
