"""The router's forward tracker, which a rebalance asks before workers drop experts: a forward that started before
a table swap counts as old until it ends, whatever runs after it; idle counts as none."""

from __future__ import annotations

import threading

import pytest

from model.generation import generate
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.sampling import SamplingParams
from router.forward_tracker import ForwardTracker, TrackedMixtral

PROMPT = [1, 328, 298, 26, 43]
GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)


class HeldExperts:
    """The in-process experts, holding the first forward in layer 0 until `release` is set."""

    def __init__(self, experts):
        self.experts, self.entered, self.release = experts, threading.Event(), threading.Event()
        self.held = False

    def __call__(self, layer, hidden, expert_ids, weights):
        if not self.held:
            self.held = True
            self.entered.set()
            assert self.release.wait(60)
        return self.experts(layer, hidden, expert_ids, weights)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tracker") / "ck", "tiny", seed=5)


def test_idle_router_has_no_old_forward():
    t = ForwardTracker()
    t.swapped()
    assert t.old_in_flight() == 0 and t.wait_old_done(0.0)


def test_a_forward_running_across_a_swap_defers_the_drop_until_it_ends(ck):
    model = TrackedMixtral.from_pretrained(ck)
    model.tracker = tracker = ForwardTracker()
    expected = generate(Mixtral.from_pretrained(ck), [PROMPT], GREEDY)[0][0]
    model.experts = held = HeldExperts(model.experts)
    out: list = []
    old = threading.Thread(target=lambda: out.append(generate(model, [PROMPT], GREEDY)[0][0]))
    old.start()
    assert held.entered.wait(60)  # a forward is inside layer 0, on the table before the swap
    tracker.swapped()
    assert tracker.old_in_flight() == 1 and not tracker.wait_old_done(0.2)
    # a forward that starts after the swap (here: on another thread) neither counts nor unblocks the drop
    assert generate(model, [PROMPT], GREEDY)[0][0] == expected
    assert tracker.old_in_flight() == 1 and not tracker.wait_old_done(0.0)
    waiter = threading.Thread(target=lambda: out.append(tracker.wait_old_done(60)))
    waiter.start()
    held.release.set()
    old.join(60)
    waiter.join(60)
    assert out == [expected, True] or out == [True, expected]
    assert tracker.old_in_flight() == 0


def test_a_failed_forward_is_not_left_in_flight(ck):
    model = TrackedMixtral.from_pretrained(ck)
    model.tracker = tracker = ForwardTracker()

    def broken(*_):
        raise RuntimeError("expert worker gone")

    model.experts = broken
    with pytest.raises(RuntimeError):
        generate(model, [PROMPT], GREEDY)
    tracker.swapped()
    assert tracker.wait_old_done(0.0)
