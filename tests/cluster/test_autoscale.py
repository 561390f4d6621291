"""The autoscaling decision on measured load signals, and the serve flags for replicas, rebalancing and
autoscaling (checked before anything starts)."""

from types import SimpleNamespace

import pytest

from cluster.autoscale import AutoscaleConfig, Autoscaler, LoadSignal
from cluster.cli import main
from cluster.rebalance_flags import DEFAULT_INTERVAL_S, settings_from_args

CFG = AutoscaleConfig(min_workers=2, max_workers=4, up_windows=2, idle_s=10.0, cooldown_s=5.0)
BUSY = LoadSignal(seconds=5, expert_share=0.7, worker_busy={"w0": 0.5, "w1": 0.4}, waiting=3)
IDLE = LoadSignal(seconds=5, expert_share=0.0, worker_busy={"w0": 0.0, "w1": 0.0}, waiting=0)


def test_scale_up_only_when_overload_is_sustained_and_every_worker_busy():
    a = Autoscaler(CFG)
    assert a.decide(BUSY, 3, now=100)[0] == 0  # one window is not enough
    delta, why = a.decide(BUSY, 3, now=105)
    assert delta == 1 and "overloaded for 2 windows" in why and "3 waiting" in why
    assert a.decide(BUSY, 4, now=106)[0] == 0  # cooling down
    assert a.decide(BUSY, 4, now=120)[0] == 0 and a.decide(BUSY, 4, now=125)[0] == 0  # at --max-workers
    b = Autoscaler(CFG)
    one_idle_worker = LoadSignal(5, 0.7, {"w0": 0.6, "w1": 0.05}, waiting=3)
    no_queue = LoadSignal(5, 0.7, {"w0": 0.6, "w1": 0.6}, waiting=0)
    router_bound = LoadSignal(5, 0.2, {"w0": 0.6, "w1": 0.6}, waiting=3)
    for t, signal in enumerate([one_idle_worker, no_queue, router_bound] * 3):
        assert b.decide(signal, 3, now=100 + 5 * t)[0] == 0, signal


def test_scale_down_after_an_idle_window_down_to_min():
    a = Autoscaler(CFG)
    assert a.decide(IDLE, 3, now=100)[0] == 0  # idle since 95
    assert a.decide(IDLE, 3, now=104)[0] == 0
    delta, why = a.decide(IDLE, 3, now=106)
    assert delta == -1 and "idle for 11 s" in why
    assert a.decide(IDLE, 2, now=130)[0] == 0  # at --min-workers
    busy_again = Autoscaler(CFG)
    busy_again.decide(IDLE, 3, now=100)
    busy_again.decide(BUSY, 3, now=103)  # any load restarts the idle clock
    assert busy_again.decide(IDLE, 3, now=106)[0] == 0


def test_bounds_are_restored_first():
    assert Autoscaler(CFG).decide(IDLE, 1, now=0)[0] == 1
    assert Autoscaler(CFG).decide(BUSY, 5, now=0)[0] == -1


def args(**kw):
    base = dict(workers=4, redundant_experts=0, target_imbalance=1.2, rebalance_interval=None, autoscale=False,
                min_workers=None, max_workers=None)
    return SimpleNamespace(**{**base, **kw})


def test_settings_from_flags():
    s = settings_from_args(args(), 8)
    assert s.rebalance.interval_s is None and s.autoscale is None  # only POST /v1/admin/rebalance
    s = settings_from_args(args(redundant_experts=4), 8)
    assert (s.rebalance.redundant_experts, s.rebalance.interval_s) == (4, DEFAULT_INTERVAL_S)
    s = settings_from_args(args(redundant_experts=4, autoscale=True, rebalance_interval=5.0), 8)
    assert (s.autoscale.min_workers, s.autoscale.max_workers, s.rebalance.interval_s) == (1, 12, 5.0)


@pytest.mark.parametrize("kw, message", [
    (dict(min_workers=2), "--min-workers / --max-workers: only with --autoscale"),
    (dict(autoscale=True, min_workers=5), "--workers 4 is outside"),
    (dict(autoscale=True, min_workers=3, max_workers=2), "--max-workers (2) is below --min-workers (3)"),
    (dict(autoscale=True, max_workers=9), "--max-workers 9: only 8 expert slots per layer"),
    (dict(workers=9), "--workers 9: more workers than the 8 expert slots"),
])
def test_bad_combinations_name_the_flag(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_args(args(**kw), 8)


@pytest.mark.parametrize("flag, value", [("--redundant-experts", "-1"), ("--target-imbalance", "0.9"),
                                         ("--rebalance-interval", "0"), ("--min-workers", "0"),
                                         ("--max-workers", "x")])
def test_bad_flag_values_rejected_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
