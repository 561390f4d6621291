"""RemoteExperts over live in-process gRPC workers: rows split over replicas give the single-replica result bit
for bit with one Dispatch per worker, a dead replica's rows go to a live one within the same forward,
swap_table takes effect at the next forward and closes channels no longer used."""

import asyncio
import threading
import time

import pytest
import torch

from model.mixtral import Mixtral
from router.remote_experts import ExpertUnavailableError, RemoteExperts, RoutingTable, split_rows
from tests.model.hf_reference import write_hf_checkpoint
from workers.expert_worker import ExpertWorker
from workers.servicer import serve_worker

LAYERS, EXPERTS = 2, 8
ALL = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]


class Workers:
    """gRPC expert workers on one event-loop thread; `stop(i)` makes worker i refuse connections."""

    def __init__(self, model_dir, pairs_per_worker):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers, self.addresses = [], []
        for i, pairs in enumerate(pairs_per_worker):
            worker = ExpertWorker(str(model_dir), pairs, worker_id=f"w{i}")
            srv, port = self._run(serve_worker(worker, "127.0.0.1", 0))
            self.servers.append(srv)
            self.addresses.append(f"127.0.0.1:{port}")

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self, i: int) -> None:
        self._run(self.servers[i].stop(0))

    def close(self) -> None:
        for srv in self.servers:
            self._run(srv.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("replicas")
    write_hf_checkpoint(d, seed=5)
    return d


@pytest.fixture
def workers(model_dir):
    # EXPERTMESH_KERNELS=invariant (tests/conftest.py) runs one row-invariant kernel: splits agree bit for bit
    # w0 hosts everything; w1 experts 0-3, w2 experts 4-7 (each in both layers)
    ws = Workers(model_dir, [ALL, [p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]])
    yield ws
    ws.close()


def layer_inputs(seed: int, tokens: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=g)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)
    return hidden, ids, weights


def test_split_rows_is_even_and_deterministic():
    assert split_rows(10, 7, ["a", "b"]) == [("a", 10, 3), ("b", 13, 4)]
    assert split_rows(0, 1, ["a", "b", "c"]) == [("c", 0, 1)]
    assert split_rows(0, 6, ["a", "b", "c"]) == [("a", 0, 2), ("b", 2, 2), ("c", 4, 2)]


def test_replicas_split_rows_bit_identical_one_dispatch_per_worker(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts
    a = workers.addresses
    single = RoutingTable.from_pairs([ALL], [a[0]], ["w0"])
    replicated = RoutingTable.from_pairs([ALL, [p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]], a,
                                         ["w0", "w1", "w2"])
    assert replicated.replicas[(1, 2)] == (a[0], a[1]) and replicated.replicas[(0, 6)] == (a[0], a[2])
    one, many = RemoteExperts(single, EXPERTS, timeout_s=10), RemoteExperts(replicated, EXPERTS, timeout_s=10)
    calls = []
    many.add_listener(lambda layer, addr, experts, counts, *_: calls.append((layer, addr, experts, counts)))
    try:
        for layer in range(LAYERS):
            hidden, ids, weights = layer_inputs(layer)
            ref = one(layer, hidden, ids, weights)
            torch.testing.assert_close(ref, local(layer, hidden, ids, weights), rtol=1e-5, atol=1e-6)
            assert torch.equal(many(layer, hidden, ids, weights), ref)
        assert {addr for _, addr, _, _ in calls} == set(a)  # every replica got rows
        per_layer_worker = [(layer, addr) for layer, addr, _, _ in calls]
        assert len(per_layer_worker) == len(set(per_layer_worker))  # one Dispatch per worker per layer
        counts = torch.bincount(layer_inputs(0)[1].reshape(-1), minlength=EXPERTS).tolist()
        sent = {e: 0 for e in range(EXPERTS)}
        for layer, _, experts, ns in calls:
            if layer == 0:
                for e, n in zip(experts, ns, strict=True):
                    sent[e] += n
        assert [sent[e] for e in range(EXPERTS)] == counts
    finally:
        one.close()
        many.close()


def test_dead_replica_rerouted_in_the_same_forward(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts
    a = workers.addresses
    table = RoutingTable.from_pairs([ALL, [p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]], a)
    backend = RemoteExperts(table, EXPERTS, timeout_s=10)
    try:
        workers.stop(1)
        hidden, ids, weights = layer_inputs(3)
        assert torch.equal(backend(0, hidden, ids, weights), local(0, hidden, ids, weights))
        assert list(backend.plane.down) == [a[1]]
        assert backend.stats.failed_rpcs == 1
        # no live replica left for experts 0-3: the forward raises the retryable error, naming the worker
        backend.swap_table(RoutingTable.from_pairs([[p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]],
                                                   a[1:], ["w1", "w2"]))
        with pytest.raises(ExpertUnavailableError, match="w1"):
            backend(0, hidden, ids, weights)
    finally:
        backend.close()


def test_swap_table_next_forward_and_closes_unused_channels(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts
    a = workers.addresses
    backend = RemoteExperts(RoutingTable.from_pairs([ALL], [a[0]]), EXPERTS, timeout_s=10)
    seen = []
    backend.add_listener(lambda layer, addr, *_: seen.append(addr))
    try:
        hidden, ids, weights = layer_inputs(4)
        backend(0, hidden, ids, weights)  # a forward begins on the old table ...
        backend.plane.mark_down(a[0], "test")
        new = RoutingTable.from_pairs([[p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]], a[1:])
        backend.swap_table(new, close_grace_s=2.0)
        assert backend.plane.generation == 1 and not backend.plane.down  # a swap starts every address healthy
        seen.clear()
        assert torch.equal(backend(1, hidden, ids, weights), local(1, hidden, ids, weights))
        assert set(seen) == {a[0]}  # ... and finishes on it: the swap never lands mid-forward
        seen.clear()
        assert torch.equal(backend(0, hidden, ids, weights), local(0, hidden, ids, weights))
        assert set(seen) == set(a[1:])  # the next forward uses the new table
        deadline = time.monotonic() + 15
        while a[0] in backend.connected():  # closed after the grace period
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert backend.connected() == sorted(a[1:])
    finally:
        backend.close()


def test_layer_dispatches_start_no_thread(workers, model_dir, monkeypatch):
    """A health Watch held open per channel keeps gRPC's channel thread alive between layers: a layer sent to
    several workers (all but the last as futures) starts no thread, where it used to start one per layer."""
    a = workers.addresses
    table = RoutingTable.from_pairs([[p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]], a[1:])
    backend = RemoteExperts(table, EXPERTS, timeout_s=10)
    started = []
    real_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        real_start(thread)

    try:
        hidden, ids, weights = layer_inputs(5)
        backend(0, hidden, ids, weights)  # warm: channels connected
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for layer in (0, 1, 0, 1, 0, 1):
            backend(layer, hidden, ids, weights)
        assert started == []
        monkeypatch.setattr(threading.Thread, "start", real_start)
        for addr in a[1:]:  # with no call open on a channel, the next layer starts its thread again (and reopens)
            backend._watches.pop(addr).cancel()
        time.sleep(0.2)
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        backend(0, hidden, ids, weights)
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert len(started) >= 1
        watches = list(backend._watches.values())
        assert len(watches) >= 1 and not any(w.done() for w in watches)  # reopened for the next layers
    finally:
        backend.close()
    assert all(w.done() for w in watches)  # closed with their channels
