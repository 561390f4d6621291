"""The dispatch path of RemoteExperts over live gRPC workers: layers submitted before any is waited for (futures
of sync stubs, sent from the calling thread) give exactly the blocking call's result; listeners run on the
waiting thread; a worker that accepts a Dispatch but never answers misses its deadline, is marked down and its
rows go to a live replica in the same forward; one worker answering every row of a layer (its reply used as
the sorted output, no copy) gives the in-process result at decode and prefill sizes."""

import asyncio
import threading
import time

import grpc
import pytest
import torch

from model.mixtral import Mixtral
from protos import expert_pb2_grpc
from router.remote_experts import RemoteExperts, RoutingTable
from tests.router.test_remote_experts import ALL, EXPERTS, LAYERS, Workers, layer_inputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.model.hf_reference import write_hf_checkpoint

    d = tmp_path_factory.mktemp("dispatch")
    write_hf_checkpoint(d, seed=7)
    return d


@pytest.fixture
def workers(model_dir):  # EXPERTMESH_KERNELS=invariant (tests/conftest.py): splits agree bit for bit
    ws = Workers(model_dir, [ALL, [p for p in ALL if p[1] < 4], [p for p in ALL if p[1] >= 4]])
    yield ws
    ws.close()


def test_submitted_layers_in_flight_together_equal_blocking_calls(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts
    a = workers.addresses
    backend = RemoteExperts(RoutingTable.from_pairs([ALL, [p for p in ALL if p[1] < 4],
                                                     [p for p in ALL if p[1] >= 4]], a), EXPERTS, timeout_s=10)
    events = []
    backend.add_listener(lambda layer, addr, experts, counts, seconds, sent, received: events.append(
        (layer, addr, threading.get_ident(), seconds, sent, received)))
    try:
        inputs = [layer_inputs(10 + layer, tokens=5 + 3 * layer) for layer in range(LAYERS)]
        blocking = [backend(layer, *inputs[layer]) for layer in range(LAYERS)]  # layer 0 starts step 1
        n_blocking = len(events)
        # step 2: every layer sent before any is waited for (the ping-pong pattern: submit, compute, wait)
        pending = [backend.submit(layer, *inputs[layer]) for layer in range(LAYERS)]
        piped = [backend.wait(p) for p in reversed(pending)][::-1]
        for layer in range(LAYERS):
            assert torch.equal(piped[layer], local(layer, *inputs[layer]))
            assert torch.equal(blocking[layer], local(layer, *inputs[layer]))
        assert backend.step == 2
        assert {addr for _, addr, *_ in events} == set(a)
        assert all(tid == threading.get_ident() for _, _, tid, *_ in events)  # on the waiting thread
        assert all(seconds > 0 and sent > 0 and received > 0 for *_, seconds, sent, received in events)
        s = backend.stats
        assert s.rpcs == len(events) == 2 * n_blocking and s.failed_rpcs == 0
        assert s.wall_seconds > 0 and sum(s.per_worker_rpcs.values()) == s.rpcs
        assert s.tokens == 2 * sum(2 * inp[0].shape[0] for inp in inputs)  # (token, slot) pairs, twice
    finally:
        backend.close()


class SilentExperts(expert_pb2_grpc.ExpertServiceServicer):
    """Accepts every Dispatch and never answers (a hung worker: the connection stays up)."""

    async def Dispatch(self, request, context):
        await asyncio.sleep(60)


def test_deadline_marks_a_silent_worker_down_and_reroutes(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts

    async def start_silent():
        server = grpc.aio.server()
        expert_pb2_grpc.add_ExpertServiceServicer_to_server(SilentExperts(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"

    server, silent = workers._run(start_silent())
    table = RoutingTable.from_pairs([ALL, ALL], [silent, workers.addresses[0]], ["silent", "w0"])
    backend = RemoteExperts(table, EXPERTS, timeout_s=1.0)
    try:
        hidden, ids, weights = layer_inputs(21, tokens=9)
        t0 = time.monotonic()
        assert torch.equal(backend(1, hidden, ids, weights), local(1, hidden, ids, weights))
        assert time.monotonic() - t0 < 20
        assert list(backend.plane.down) == [silent] and "DEADLINE_EXCEEDED" in backend.plane.down[silent]
        assert backend.stats.failed_rpcs == 1
    finally:
        backend.close()
        workers._run(server.stop(0))


def test_one_worker_answering_every_row_agrees_with_local(workers, model_dir):
    local = Mixtral.from_pretrained(model_dir).experts
    backend = RemoteExperts(RoutingTable.from_pairs([ALL], [workers.addresses[0]]), EXPERTS, timeout_s=10)
    try:
        for tokens in (1, 64):  # 2 and 128 rows, all to one worker
            hidden, ids, weights = layer_inputs(30 + tokens, tokens=tokens)
            assert torch.equal(backend(0, hidden, ids, weights), local(0, hidden, ids, weights))
        assert backend.stats.rpcs == 2
    finally:
        backend.close()
