"""The engine over RemoteExperts and live in-process gRPC workers: a step that loses its only worker is held
(nothing advanced) until a new routing table comes, then every request finishes exactly as without the
failure; a request fails only at its deadline, or at once when nobody repairs the expert plane."""

import threading
import time

import pytest

from model.mixtral import Mixtral
from model.sampling import SamplingParams
from router.engine import Engine
from router.errors import STATUS_UNAVAILABLE
from router.metrics import RouterMetrics
from router.remote_experts import RemoteExperts, RoutingTable
from router.requests import GenerationRequest
from router.scheduler import EngineConfig

from .test_remote_experts import ALL, EXPERTS, Workers, model_dir  # noqa: F401 - model_dir is a fixture

LOW, HIGH = [p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]
PROMPTS = [[5, 6, 7, 8], [100, 3, 42], [7] * 9, [250, 11]]


@pytest.fixture
def backend(model_dir):  # noqa: F811
    ws = Workers(model_dir, [LOW, HIGH])
    remote = RemoteExperts(RoutingTable.from_pairs([LOW, HIGH], ws.addresses, ["w0", "w1"]), EXPERTS, timeout_s=5)
    yield ws, remote, Mixtral.from_pretrained(model_dir, experts=remote)
    remote.close()
    ws.close()


def add_all(engine: Engine, max_tokens: int = 12) -> None:
    for i, p in enumerate(PROMPTS):
        engine.add_request(GenerationRequest(request_id=f"r{i}", prompt_ids=tuple(p),
                                             sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def drain(engine: Engine, tokens: dict, final: dict) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
            if out.finished:
                final[out.request_id] = out


def test_held_step_resumes_after_table_swap_with_identical_output(backend, model_dir):  # noqa: F811
    ws, remote, model = backend
    reference: dict = {}
    engine = Engine(model, EngineConfig(num_kv_blocks=64))
    add_all(engine)
    drain(engine, reference, {})

    metrics = RouterMetrics()
    engine = Engine(model, EngineConfig(num_kv_blocks=64), metrics=metrics)
    add_all(engine)
    tokens: dict = {}
    while min((len(tokens.get(f"r{i}", [])) for i in range(len(PROMPTS))), default=0) < 3:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
    remote.plane.supervise(60)  # as the cluster controller's heartbeat does
    ws.stop(1)
    held: list = []
    stepper = threading.Thread(target=lambda: held.extend(engine.step()))
    stepper.start()
    deadline = time.monotonic() + 30
    while not engine.stats().recovering:
        assert time.monotonic() < deadline and stepper.is_alive()
        time.sleep(0.01)
    spare = Workers(model_dir, [HIGH])
    try:
        remote.swap_table(RoutingTable.from_pairs([LOW, HIGH], [ws.addresses[0], spare.addresses[0]]))
        stepper.join(30)
        assert not stepper.is_alive()
        for out in held:
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
        final: dict = {}
        drain(engine, tokens, final)
    finally:
        spare.close()
    assert tokens == reference
    assert all(f.error is None for f in final.values())
    assert metrics.step_retries >= 1 and sum(metrics.recovery.counts) == 1
    assert not engine.stats().recovering


@pytest.mark.parametrize("supervised", [True, False])
def test_request_fails_only_at_deadline_or_when_nobody_repairs(backend, supervised):
    ws, remote, model = backend
    engine = Engine(model, EngineConfig(num_kv_blocks=64, request_timeout_s=1.5))
    if supervised:
        remote.plane.supervise(60)
    ws.stop(0)
    add_all(engine, max_tokens=4)
    t0 = time.monotonic()
    final: dict = {}
    drain(engine, {}, final)
    took = time.monotonic() - t0
    assert len(final) == len(PROMPTS)
    for out in final.values():
        assert out.error_status == STATUS_UNAVAILABLE
        if supervised:  # held until each request's own deadline
            assert "deadline" in out.error and "request timeout 1.5 s" in out.error
        else:
            assert "no controller is replacing expert workers" in out.error and "w0" in out.error
    assert (1.5 <= took < 10) if supervised else took < 1.5
    assert engine.stats().num_free_blocks == engine.stats().num_kv_blocks
