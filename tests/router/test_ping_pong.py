"""Micro-batch overlap (ping-pong): two halves of a step, one's attention running while the workers compute the
other's experts, give the in-process model's tokens and HF's logits, through `generate` and the engine; the
halves go out as separate Dispatches of the same step; a dead worker fails the step cleanly."""

import collections

import pytest
import torch

from model.experts import can_overlap
from model.generation import generate
from model.layers import AttentionBatch, micro_batches
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from router.engine import Engine
from router.expert_plane import ExpertUnavailableError
from router.overlap_choice import PROBE_STEPS, REPROBE_AFTER, OverlapChooser
from router.remote_experts import RemoteExperts, RoutingTable
from router.scheduler import EngineConfig
from tests.model.hf_reference import assert_close, assert_rows_close, hf_logits, write_hf_checkpoint
from tests.router.test_engine import request, run
from tests.router.test_remote_experts import ALL, EXPERTS, Workers

PROMPTS = [list(range(5, 25)), [7, 3, 250, 11], list(range(100, 140)), [9, 9, 9]]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pingpong")
    hf = write_hf_checkpoint(d, seed=13)
    local = Mixtral.from_pretrained(d)
    tokens, logits = generate(local, PROMPTS, PARAMS, return_logits=True)
    pairs = [[p for p in ALL if p[1] % 2 == 0], [p for p in ALL if p[1] % 2 == 1]]
    workers = Workers(d, pairs)
    yield d, hf, tokens, logits, workers, pairs
    workers.close()


def remote_model(d, workers, pairs) -> Mixtral:
    backend = RemoteExperts(RoutingTable.from_pairs(pairs, workers.addresses), EXPERTS, timeout_s=10)
    return Mixtral.from_pretrained(d, experts=backend)


def test_micro_batches_cut_where_tokens_balance():
    seqs = [([0], 9, 9), ([1], 3, 1), ([2], 5, 1), ([3], 13, 9)]  # new tokens 9, 1, 1, 9: cut after two
    parts, last = micro_batches(seqs, 16, None)
    whole = AttentionBatch.build(seqs, 16, None)
    assert [p.positions.shape[0] for p in parts] == [10, 10]
    assert torch.equal(last, whole.last_token)
    assert torch.equal(torch.cat([p.positions for p in parts]), whole.positions)
    with pytest.raises(ValueError, match="at least two"):
        micro_batches(seqs[:1], 16, None)


def test_overlapped_generate_equals_in_process_and_hf(setup):
    d, hf, tokens, logits, workers, pairs = setup
    model = remote_model(d, workers, pairs)
    assert can_overlap(model.experts) and not can_overlap(Mixtral.from_pretrained(d).experts)
    log = []
    model.experts.add_listener(lambda layer, addr, *rest: log.append((model.experts.step, layer, addr)))
    try:
        out, remote_logits = generate(model, PROMPTS, PARAMS, return_logits=True, overlap=True)
    finally:
        model.experts.close()
    assert out == tokens
    for p, toks, ours, ref in zip(PROMPTS, out, remote_logits, logits, strict=True):
        assert_close(ours, ref, rtol=1e-5)
        assert_rows_close(ours, hf_logits(hf, p + toks)[len(p) - 1:-1], rtol=1e-5)
    sent = collections.Counter(log)
    assert model.experts.step == PARAMS.max_tokens  # both halves of a step count as one step
    assert max(sent.values()) == 2  # a worker got one Dispatch per half in the same (step, layer)


def test_engine_with_overlap_serves_the_reference_tokens(setup):
    d, _, tokens, _, workers, pairs = setup
    model = remote_model(d, workers, pairs)
    try:
        engine = Engine(model, EngineConfig(num_kv_blocks=64, overlap="on"))
        got, final = run(engine, {0: [request(f"r{i}", p, PARAMS) for i, p in enumerate(PROMPTS[:3])],
                                  2: [request("r3", PROMPTS[3], PARAMS)]})
    finally:
        model.experts.close()
    assert {rid: got[rid] for rid in final} == {f"r{i}": tokens[i] for i in range(4)}
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_kv_blocks and stats.overlapped_steps_total > 0
    assert stats.overlap_choices == {}  # `on` measures nothing


def test_engine_with_overlap_auto_probes_both_ways_and_reports_its_choice(setup):
    d, _, tokens, _, workers, pairs = setup
    model = remote_model(d, workers, pairs)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    try:
        engine = Engine(model, EngineConfig(num_kv_blocks=64, overlap="auto"))
        got, _ = run(engine, {0: [request(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]})
    finally:
        model.experts.close()
    assert all(got[f"r{i}"][:PARAMS.max_tokens] == tokens[i] for i in range(4))
    stats = engine.stats()
    assert stats.overlapped_steps_total >= PROBE_STEPS  # the halves were timed as often as the whole
    assert stats.overlap_choices["decode 4-7"] in ("on", "off")  # 19 decode steps of 4: probed, then chosen
    assert Engine(Mixtral.from_pretrained(d), EngineConfig(num_kv_blocks=8, overlap="auto")).stats(
    ).overlap_choices == {}  # in-process experts: nothing to overlap, auto is off


def test_overlap_chooser_probes_alternately_then_keeps_the_faster():
    c = OverlapChooser("auto")
    assert not c.split(1, False)
    modes = []
    for _ in range(2 * PROBE_STEPS):
        split = c.split(5, False)
        modes.append(split)
        c.record(5, False, split, 0.05 if split else 0.10, 5)  # the halves twice as fast
    assert modes == [False, True] * PROBE_STEPS
    assert c.choices() == {"decode 4-7": "on"} and c.split(6, False)
    assert not c.split(5, True) and c.choices()["prefill 4-7"] == "probing"  # another group probes on its own
    slow = OverlapChooser("auto")
    for _ in range(2 * PROBE_STEPS):
        split = slow.split(2, False)
        slow.record(2, False, split, 0.099 if split else 0.10, 1)  # within the margin: stays whole
    assert slow.choices() == {"decode 2-3": "off"} and not slow.split(3, False)
    for _ in range(REPROBE_AFTER):
        slow.split(2, False)
    assert slow.split(2, False) is False and slow.choices() == {"decode 2-3": "probing"}  # probes again
    assert OverlapChooser("on").split(2, True) and not OverlapChooser("on").split(1, False)
    assert not OverlapChooser("off").split(64, False)
    with pytest.raises(ValueError, match="overlap"):
        OverlapChooser("sometimes")


def test_a_dead_worker_fails_the_overlapped_step_and_cancels_the_other_half(tmp_path):
    write_hf_checkpoint(tmp_path, seed=13)
    pairs = [[p for p in ALL if p[1] % 2 == 0], [p for p in ALL if p[1] % 2 == 1]]
    workers = Workers(tmp_path, pairs)
    model = remote_model(tmp_path, workers, pairs)
    try:
        workers.stop(1)  # no replica of the odd experts
        with pytest.raises(ExpertUnavailableError, match="no live replica"):
            generate(model, PROMPTS, PARAMS, overlap=True)
    finally:
        model.experts.close()
        workers.close()
