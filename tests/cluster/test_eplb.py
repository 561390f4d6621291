"""EPLB placement on synthetic loads: every expert placed, capacity respected, hot experts replicated."""

import random

import pytest

from cluster.eplb import layer_imbalance, rebalance_experts, replicate
from cluster.placement import PlacementError, PlacementPlan, imbalance


def skewed(num_layers: int, num_experts: int, seed: int, hot_share: float = 0.45) -> list[list[float]]:
    """Like `--router-skew 1.2`: one expert per layer takes about hot_share of the layer's tokens."""
    rng = random.Random(seed)
    load = []
    for layer in range(num_layers):
        row = [rng.uniform(50, 150) for _ in range(num_experts)]
        hot = (3 * layer + 1) % num_experts
        row[hot] = hot_share / (1 - hot_share) * (sum(row) - row[hot])
        load.append(row)
    return load


def check_valid(plan: PlacementPlan, num_workers: int, slots_per_layer: int) -> None:
    assert plan.num_workers == num_workers
    cap = -(-slots_per_layer // num_workers)
    for row in plan.workers_of:
        assert all(row), "every expert placed"
        assert sum(len(ws) for ws in row) == slots_per_layer
        per_worker = [sum(w in ws for ws in row) for w in range(num_workers)]
        assert max(per_worker) <= cap and min(per_worker) >= slots_per_layer // num_workers, per_worker
        for ws in row:
            assert len(set(ws)) == len(ws), "no two replicas of one expert on one worker"
    pairs = plan.all_pairs()
    assert all(pairs) and [plan.pairs(w) for w in range(num_workers)] == [sorted(p) for p in pairs]


@pytest.mark.parametrize("workers,redundant", [(4, 4), (4, 0), (3, 4), (5, 4), (2, 6), (8, 8)])
def test_plan_is_valid_and_reports_balance(workers, redundant):
    load = skewed(6, 8, seed=workers * 10 + redundant)
    plan = rebalance_experts(load, workers, redundant)
    check_valid(plan, workers, 8 + redundant)
    after = layer_imbalance(plan, load)
    static = layer_imbalance(PlacementPlan.build(6, 8, min(workers, 8)), load)
    assert all(a >= 1.0 for a in after)
    assert max(after) <= max(static) + 1e-9


def test_skewed_load_replicates_the_hot_expert_and_balances():
    load = skewed(4, 8, seed=1)
    plan = rebalance_experts(load, 4, 4)
    for layer, row in enumerate(load):
        hot = max(range(8), key=row.__getitem__)
        assert len(plan.workers_of[layer][hot]) >= 2
        cold = min(range(8), key=row.__getitem__)
        assert len(plan.workers_of[layer][cold]) == 1
    assert max(layer_imbalance(plan, load)) <= 1.15
    # Static placement leaves every step waiting for the worker of the hot expert.
    assert min(layer_imbalance(PlacementPlan.build(4, 8, 4), load)) > 1.5


def test_replicate_gives_slots_to_the_highest_load_per_replica():
    assert replicate([90, 10, 10, 10], 6, 4) == [3, 1, 1, 1]
    assert replicate([40, 30, 0, 0], 6, 4) == [2, 2, 1, 1]
    assert replicate([0, 0, 0, 0], 6, 4) == [2, 2, 1, 1]  # no load: spread, not piled on one expert
    assert replicate([100, 1], 5, 3) == [3, 2]  # one replica per worker at most


def test_current_placement_is_kept_where_it_balances_anyway():
    load = skewed(3, 8, seed=5)
    first = rebalance_experts(load, 4, 4)
    again = rebalance_experts(load, 4, 4, current=first.all_pairs())
    assert again == first  # nothing moves when the load did not change
    # Workers listed in another order: the plan follows them instead of reshuffling every worker.
    rotated = first.all_pairs()[1:] + first.all_pairs()[:1]
    moved = rebalance_experts(load, 4, 4, current=rotated)
    assert moved.all_pairs() == rotated


def test_scale_up_and_down_keep_most_pairs():
    load = skewed(3, 8, seed=7)
    four = rebalance_experts(load, 4, 4)
    five = rebalance_experts(load, 5, 4, current=four.all_pairs() + [[]])
    check_valid(five, 5, 12)
    kept = sum(len(set(a) & set(b)) for a, b in zip(four.all_pairs(), five.all_pairs()[:4], strict=True))
    assert kept >= 0.5 * four.slots()
    three = rebalance_experts(load, 3, 4, current=four.all_pairs()[:3])
    check_valid(three, 3, 12)


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(PlacementError, match="every worker needs a slot"):
        rebalance_experts([[1.0] * 8], 9, 0)
    capped = rebalance_experts([[1.0] * 2], 2, 3)  # 2 workers hold 2 replicas of each expert at most
    assert capped.replica_counts() == [[2, 2]]
    with pytest.raises(PlacementError, match="finite"):
        rebalance_experts([[1.0, float("nan")]], 2, 0)
    with pytest.raises(PlacementError, match="same number"):
        rebalance_experts([[1.0, 2.0], [1.0]], 1, 0)
    with pytest.raises(PlacementError, match="current placement lists 1 workers"):
        rebalance_experts([[1.0, 2.0]], 2, 0, current=[[(0, 0)]])


def test_build_plans_keep_their_shape():
    plan = PlacementPlan.build(2, 8, 3, "round-robin")
    assert plan.experts_of_worker == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert plan.pairs(2) == [(0, 2), (0, 5), (1, 2), (1, 5)]
    assert plan.worker_of_expert()[7] == 1
    assert PlacementPlan.build(2, 8, 3).experts_of_worker == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert PlacementPlan.from_worker_pairs(2, 8, plan.all_pairs()) == plan
    with pytest.raises(PlacementError, match="hosts no expert"):
        PlacementPlan.from_worker_pairs(1, 2, [[(0, 0), (0, 1)], []])
    with pytest.raises(PlacementError, match="layer 0 expert 1 has no worker"):
        PlacementPlan.from_worker_pairs(1, 2, [[(0, 0)]])
    assert imbalance([3.0, 1.0]) == 1.5 and imbalance([0.0, 0.0]) == 1.0


@pytest.mark.parametrize("workers, redundant, slots", [(4, 4, 12), (2, 2, 10), (1, 3, 8), (3, 0, 8)])
def test_startup_plan_has_the_redundant_slots_from_the_start(workers, redundant, slots):
    """serve --redundant-experts N: E + N slots per layer before any load is measured (at most one replica of an
    expert per worker), spread evenly; without N the --placement plan."""
    from cluster.deployment import ClusterConfig, startup_plan

    cfg = ClusterConfig("unused", workers, placement="round-robin", redundant_experts=redundant)
    plan = startup_plan(3, 8, cfg)
    assert [sum(row) for row in plan.replica_counts()] == [slots] * 3
    assert all(len(p) in (3 * (slots // workers), 3 * -(-slots // workers)) for p in plan.all_pairs())
    if not redundant:
        assert plan == PlacementPlan.build(3, 8, workers, "round-robin")
