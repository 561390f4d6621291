"""The expert view of a load test: expert load, worker imbalance and dispatch latency from /metrics deltas."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

EXPERT_TOKENS = "expertmesh_expert_tokens_total"  # counter {layer, expert}
WORKER_TOKENS = "expertmesh_worker_dispatch_tokens_total"  # counter {worker}
DISPATCH = "expertmesh_dispatch_duration_seconds"  # histogram {worker}

Labels = tuple[tuple[str, str], ...]
Snapshot = dict[tuple[str, Labels], float]  # (sample name, sorted labels) -> value


def parse_metrics(text: str) -> Snapshot:
    """Prometheus text -> samples; a `ray_` prefix (Ray's metrics agent) is dropped."""
    snap: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name[4:] if s.name.startswith("ray_expertmesh_") else s.name
            snap[(name, tuple(sorted(s.labels.items())))] = float(s.value)
    return snap


def scrape(base_url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None
           ) -> tuple[Snapshot | None, str]:
    """(samples, "") from <base_url>/metrics, or (None, why not)."""
    url = base_url.rstrip("/") + "/metrics"
    try:
        r = httpx.get(url, timeout=timeout_s, headers=headers)
        if r.status_code != 200:
            return None, f"{url} answered HTTP {r.status_code}"
        return parse_metrics(r.text), ""
    except (httpx.HTTPError, ValueError) as e:
        return None, f"{url}: {type(e).__name__}: {e}"


def delta(before: Snapshot, after: Snapshot) -> Snapshot:
    """after - before per sample; a counter that went down was reset, so its delta is its new value."""
    out = {}
    for key, v in after.items():
        d = v - before.get(key, 0.0)
        out[key] = v if d < 0 else d
    return out


def _sum_by(snap: Snapshot, name: str, *by: str) -> dict[tuple[str, ...], float]:
    """Sum the samples of one name over all labels except `by` (e.g. Ray's node labels)."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (n, labels), v in snap.items():
        if n == name:
            d = dict(labels)
            if all(b in d for b in by):
                out[tuple(d[b] for b in by)] += v
    return dict(out)


def _sort_key(s: str) -> tuple[int, Any]:
    return (0, int(s)) if s.lstrip("-").isdigit() else (1, s)


def _max_mean(values: list[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets, linear within a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_cum = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if math.isinf(le):
                return prev_le  # in the +Inf bucket: the highest finite bound
            if cum == prev_cum:
                return le
            return prev_le + (le - prev_le) * (rank - prev_cum) / (cum - prev_cum)
        prev_le, prev_cum = le, cum
    return prev_le


def build_view(d: Snapshot) -> dict[str, Any]:
    """The run's expert-load, worker-imbalance and dispatch-latency summary from a metrics delta."""
    view: dict[str, Any] = {"available": True, "layers": None, "expert_max_mean": None, "workers": None,
                            "dispatch": None}
    experts = _sum_by(d, EXPERT_TOKENS, "layer", "expert")
    if experts:
        per_layer: dict[str, dict[str, float]] = defaultdict(dict)
        for (layer, expert), v in experts.items():
            per_layer[layer][expert] = v
        layers = []
        for layer in sorted(per_layer, key=_sort_key):
            loads = per_layer[layer]
            total = sum(loads.values())
            hot = max(sorted(loads, key=_sort_key), key=lambda e: loads[e])
            layers.append({"layer": layer, "tokens": total, "experts": len(loads),
                           "max_mean": _max_mean(list(loads.values())), "hottest_expert": hot,
                           "hottest_share": loads[hot] / total if total else None})
        view["layers"] = layers
        ratios = [x["max_mean"] for x in layers if x["max_mean"] is not None]
        view["expert_max_mean"] = max(ratios) if ratios else None
    workers = {w: v for (w,), v in _sum_by(d, WORKER_TOKENS, "worker").items()}
    if workers:
        view["workers"] = {"tokens": dict(sorted(workers.items(), key=lambda kv: _sort_key(kv[0]))),
                           "max_mean": _max_mean(list(workers.values()))}
    sums = _sum_by(d, DISPATCH + "_sum", "worker")
    counts = _sum_by(d, DISPATCH + "_count", "worker")
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (w, le), v in _sum_by(d, DISPATCH + "_bucket", "worker", "le").items():
        buckets[w].append((float(le), v))
    if counts:
        dispatch = {}
        for (w,), n in sorted(counts.items(), key=lambda kv: _sort_key(kv[0][0])):
            p99 = histogram_quantile(0.99, buckets.get(w, []))
            dispatch[w] = {"count": n, "mean_ms": 1e3 * sums.get((w,), 0.0) / n if n else None,
                           "p99_ms": None if p99 is None else 1e3 * p99}
        view["dispatch"] = dispatch
    if view["layers"] is None and view["workers"] is None and view["dispatch"] is None:
        return {"available": False, "reason": "metrics not available (no expertmesh_* metrics at /metrics)"}
    return view


def expert_view(before: Snapshot | None, after: Snapshot | None, why: str = "") -> dict[str, Any]:
    if before is None or after is None:
        return {"available": False, "reason": f"metrics not available ({why or 'no /metrics'})"}
    return build_view(delta(before, after))


def format_view(view: dict[str, Any]) -> str:
    if not view.get("available"):
        return view.get("reason", "metrics not available")
    lines = []

    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for layer in view["layers"] or []:
        share = layer["hottest_share"]
        lines.append(f"layer {layer['layer']:>3}: {layer['tokens']:>10.0f} tokens over {layer['experts']} experts, "
                     f"max/mean {ratio(layer['max_mean'])}, hottest expert {layer['hottest_expert']} "
                     f"({'n/a' if share is None else f'{100 * share:.1f}%'})")
    if view["workers"]:
        w = view["workers"]
        lines.append(f"worker imbalance (max/mean dispatched tokens): {ratio(w['max_mean'])}  "
                     + " ".join(f"{k}={v:.0f}" for k, v in w["tokens"].items()))
    for w, s in (view["dispatch"] or {}).items():
        mean = "n/a" if s["mean_ms"] is None else f"{s['mean_ms']:.3f}"
        p99 = "n/a" if s["p99_ms"] is None else f"{s['p99_ms']:.3f}"
        lines.append(f"dispatch {w}: {s['count']:.0f} calls, mean {mean} ms, p99 ~{p99} ms")
    return "\n".join(lines)
