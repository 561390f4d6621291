"""A live grpc.aio ExpertService on 127.0.0.1: results, every error status, health, Info."""

import asyncio
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import expert_pb2, expert_pb2_grpc
from protos.codec import GRPC_OPTIONS, decode_tensor, encode_tensor
from workers.expert_worker import ExpertWorker
from workers.servicer import SERVICE_NAME, serve_worker

from .conftest import reference_rows

LIMIT = 64 * 1024  # server message limit: 256 fp32 rows of D=64
TIMEOUT = 10.0
PAIRS = [(0, 2), (1, 0), (1, 4), (1, 7)]


@pytest.fixture(scope="module")
def server(mixtral_dir):
    worker = ExpertWorker(str(mixtral_dir), PAIRS, worker_id="live")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv, port = asyncio.run_coroutine_threadsafe(serve_worker(worker, "127.0.0.1", 0, LIMIT), loop).result(30)
    yield worker, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(srv.stop(1), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server[1], options=GRPC_OPTIONS(4 * LIMIT)) as ch:
        yield ch


def request(layer=1, ids=(0, 4), counts=(2, 3), hidden=None):
    hidden = torch.randn(sum(counts), 64) if hidden is None else hidden
    return expert_pb2.DispatchRequest(layer=layer, expert_ids=list(ids), counts=list(counts),
                                      hidden=encode_tensor(hidden), step=7)


def test_dispatch_is_bit_identical_to_in_process(server, channel, mixtral_dir):
    ids, counts, x, want = reference_rows(mixtral_dir, 1, [0, 4, 7], tokens=50, seed=1)
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    resp = stub.Dispatch(request(1, ids, counts, x), timeout=TIMEOUT)
    assert torch.equal(decode_tensor(resp.output, "float32", (64,)), want)
    assert resp.compute_seconds > 0


def raw_hidden(data: bytes, dtype: str, shape: list[int]) -> expert_pb2.DispatchRequest:
    msg = request()
    msg.hidden.CopyFrom(expert_pb2.Tensor(data=data, dtype=dtype, shape=shape))
    return msg


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD = [
    ("wrong shape", request(hidden=torch.zeros(5, 32)), INVALID, "expected [N, 64]"),
    ("wrong dtype", request(hidden=torch.zeros(5, 64, dtype=torch.bfloat16)), INVALID,
     "runs torch.float32"),
    ("unknown wire dtype", raw_hidden(b"\0" * 8, "int8", [2]),
     INVALID, "dtype 'int8'"),
    ("bad byte length", raw_hidden(b"\0" * 100, "float32", [5, 64]),
     INVALID, "100 bytes"),
    ("unknown layer", request(layer=9), INVALID, "layer 9 is not hosted"),
    ("expert not hosted", request(ids=(0, 5)), INVALID, "expert 5 of layer 1 is not hosted"),
    ("counts not summing", request(counts=(2, 3), hidden=torch.zeros(6, 64)), INVALID,
     "counts sum to 5, but hidden has 6 rows"),
    ("count/id mismatch", expert_pb2.DispatchRequest(layer=1, expert_ids=[0, 4], counts=[5],
                                                    hidden=encode_tensor(torch.zeros(5, 64))),
     INVALID, "2 expert_ids but 1 counts"),
    ("duplicate ids", request(ids=(4, 4)), INVALID, "duplicate expert ids"),
    ("empty", request(ids=(0,), counts=(0,)), INVALID, "empty request"),
    ("over the size limit", request(ids=(0,), counts=(300,)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


@pytest.mark.parametrize("req, code, text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_errors_get_status_and_message_and_server_keeps_serving(server, channel, req, code, text):
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Dispatch(req, timeout=TIMEOUT)
    assert err.value.code() == code
    assert text in err.value.details() and err.value.details()
    ok = stub.Dispatch(request(), timeout=TIMEOUT)
    assert list(ok.output.shape) == [5, 64]


def test_unexpected_exception_is_internal(server, channel, monkeypatch):
    worker, _ = server

    def boom(*args):
        raise RuntimeError("device on fire")

    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    monkeypatch.setattr(worker, "forward_timed", boom)
    with pytest.raises(grpc.RpcError) as err:
        stub.Dispatch(request(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "RuntimeError: device on fire"
    monkeypatch.undo()
    assert list(stub.Dispatch(request(), timeout=TIMEOUT).output.shape) == [5, 64]


def test_stats_count_tokens_and_statuses(server, channel):
    worker, _ = server
    before = worker.stats.to_dict()
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    stub.Dispatch(request(ids=(0, 7), counts=(1, 4)), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.Dispatch(request(layer=9), timeout=TIMEOUT)
    after = worker.stats.to_dict()
    assert after["tokens"][(1, 0)] - before["tokens"].get((1, 0), 0) == 1
    assert after["tokens"][(1, 7)] - before["tokens"].get((1, 7), 0) == 4
    assert after["requests"]["OK"] - before["requests"].get("OK", 0) == 1
    assert after["requests"]["INVALID_ARGUMENT"] - before["requests"].get("INVALID_ARGUMENT", 0) == 1
    assert after["compute_seconds"] > before["compute_seconds"]


def test_health_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_info(channel):
    info = expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=TIMEOUT)
    assert info.worker_id == "live"
    assert [(k.layer, k.expert) for k in info.experts] == PAIRS
    assert (info.dtype, info.device, info.hidden_size) == ("float32", "cpu", 64)
    assert info.max_message_bytes == LIMIT
    assert info.metrics_url == ""
