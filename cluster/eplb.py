"""Expert-parallel load balancing (the idea of DeepSeek's EPLB `rebalance_experts`, our own code).

Given the measured load [layers][experts] (tokens routed to each logical expert over a window), the number of
workers and `redundant` extra physical slots per layer:
1. replicate: every expert gets one slot; each extra slot goes to the expert with the highest load per
   replica (ties: fewer replicas, then lower id), never more replicas than workers;
2. pack: the slots (each carrying load / replicas, as the router splits an expert's rows evenly) go onto the
   workers heaviest first, each onto the least-loaded worker that has room and does not host that expert yet;
   a worker holds floor or ceil(slots / workers) slots of a layer;
3. keep what is there: per layer the packs are matched to workers so that as many (layer, expert) pairs as
   possible stay where they are (packs are interchangeable; this changes no load), so a rebalance moves few
   weights.
Imbalance is max / mean worker load of a layer (1.0 = balanced); balancedness would be its inverse.
"""

from __future__ import annotations

from collections.abc import Sequence

from .placement import PlacementError, PlacementPlan, imbalance


def replicate(load: Sequence[float], num_slots: int, max_replicas: int) -> list[int]:
    """Replica count per expert: one each, then every extra slot to the highest load per replica."""
    n = len(load)
    if num_slots < n:
        raise PlacementError(f"eplb: {num_slots} slots cannot hold {n} experts")
    if num_slots > n * max_replicas:
        raise PlacementError(f"eplb: {num_slots} slots for {n} experts need more than {max_replicas} replicas "
                             f"of an expert (one per worker at most); lower --redundant-experts")
    counts = [1] * n
    for _ in range(num_slots - n):
        best = max((e for e in range(n) if counts[e] < max_replicas),
                   key=lambda e: (float(load[e]) / counts[e], -counts[e], -e))
        counts[best] += 1
    return counts


def pack(load: Sequence[float], counts: Sequence[int], num_workers: int) -> list[list[int]]:
    """Slots onto workers: [worker] -> expert ids (distinct), worker slot counts floor/ceil of the mean."""
    items = sorted(((float(load[e]) / c, e) for e, c in enumerate(counts) for _ in range(c)),
                   key=lambda it: (-it[0], it[1]))
    base, extra = divmod(len(items), num_workers)
    packs: list[list[int]] = [[] for _ in range(num_workers)]
    weight = [0.0] * num_workers
    full = 0  # packs holding base + 1 slots
    for w_item, e in items:
        room = [w for w in range(num_workers) if e not in packs[w]
                and (len(packs[w]) < base or (len(packs[w]) == base and full < extra))]
        if not room:
            return _pack_round_robin(counts, num_workers)
        w = min(room, key=lambda w: (weight[w], len(packs[w]), w))
        if len(packs[w]) == base:
            full += 1
        packs[w].append(e)
        weight[w] += w_item
    return packs


def _pack_round_robin(counts: Sequence[int], num_workers: int) -> list[list[int]]:
    """Always-valid fallback: slots ordered by replica count, dealt out in turn (replicas land apart)."""
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    slots = [e for e in order for _ in range(counts[e])]
    packs: list[list[int]] = [[] for _ in range(num_workers)]
    for i, e in enumerate(slots):
        packs[i % num_workers].append(e)
    return packs


def match_to_current(packs: list[list[int]], current: Sequence[set[int]]) -> list[list[int]]:
    """Reorder packs so pack i goes to the worker i that already hosts most of it (greedy max overlap)."""
    n = len(packs)
    scored = sorted(((len(set(p) & current[w]), i, w) for i, p in enumerate(packs) for w in range(n)),
                    key=lambda t: (-t[0], t[1], t[2]))
    out: dict[int, list[int]] = {}
    taken: set[int] = set()
    for _, i, w in scored:  # every pack and every worker appear: the matching is complete
        if i not in taken and w not in out:
            out[w] = packs[i]
            taken.add(i)
    return [out[w] for w in range(n)]


def rebalance_experts(load: Sequence[Sequence[float]], num_workers: int, redundant: int = 0,
                      current: Sequence[Sequence[tuple[int, int]]] | None = None) -> PlacementPlan:
    """A plan for `num_workers` workers with num_experts + `redundant` slots per layer (fewer when the workers
    are too few to hold that many replicas: an expert lives at most once on a worker), balanced for `load`
    [layers][experts]; `current` (pairs per worker index, optional) is what to keep in place."""
    num_layers = len(load)
    if num_layers == 0:
        raise PlacementError("eplb: load has no layers")
    num_experts = len(load[0])
    if any(len(row) != num_experts for row in load):
        raise PlacementError("eplb: every layer's load must list the same number of experts")
    if any(not (float(x) >= 0) for row in load for x in row):  # NaN fails too
        raise PlacementError("eplb: loads must be finite numbers >= 0")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise PlacementError(f"workers: need at least 1 expert worker, got {num_workers}")
    if not isinstance(redundant, int) or redundant < 0:
        raise PlacementError(f"redundant experts: must be an integer >= 0, got {redundant!r}")
    if num_workers > num_experts + redundant:
        raise PlacementError(f"workers: {num_workers} workers for {num_experts + redundant} expert slots per layer "
                             f"({num_experts} experts + {redundant} redundant); every worker needs a slot")
    slots = min(num_experts + redundant, num_experts * num_workers)  # an expert at most once per worker
    if current is not None and len(current) != num_workers:
        raise PlacementError(f"eplb: current placement lists {len(current)} workers, expected {num_workers}")
    rows: list[tuple[tuple[int, ...], ...]] = []
    for layer, row in enumerate(load):
        counts = replicate(row, slots, num_workers)
        packs = pack(row, counts, num_workers)
        if current is not None:
            packs = match_to_current(packs, [{e for lay, e in pairs if lay == layer} for pairs in current])
        workers_of: list[list[int]] = [[] for _ in range(num_experts)]
        for w, experts in enumerate(packs):
            for e in experts:
                workers_of[e].append(w)
        rows.append(tuple(tuple(sorted(ws)) for ws in workers_of))
    return PlacementPlan(num_layers, num_experts, num_workers, tuple(rows))


def layer_imbalance(plan: PlacementPlan, load: Sequence[Sequence[float]]) -> list[float]:
    """Per layer: max / mean expected worker load under `plan` for `load`."""
    return [imbalance(row) for row in plan.worker_loads([list(r) for r in load])]
