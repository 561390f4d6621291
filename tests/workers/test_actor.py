"""ExpertWorkerActor in a real Ray session (fixture `ray_session` from tests/conftest.py): info, address,
one Dispatch over gRPC, stats, stop."""

import grpc
import pytest
import ray
import torch

from protos import expert_pb2, expert_pb2_grpc
from protos.codec import GRPC_OPTIONS, decode_tensor, encode_tensor
from workers.actor import ExpertWorkerActor
from workers.expert_worker import ExpertWorker

TIMEOUT = 30.0


def test_actor_serves_dispatch(ray_session, mixtral_dir):
    pairs = [(0, 1), (1, 2)]
    actor = ray.remote(num_cpus=1)(ExpertWorkerActor).remote(str(mixtral_dir), pairs, "float32", "ra")
    try:
        assert ray.get(actor.ping.remote(), timeout=120) is True
        info = ray.get(actor.info.remote(), timeout=TIMEOUT)
        assert info["pairs"] == pairs and info["worker_id"] == "ra"
        assert (info["dtype"], info["device"], info["torch_threads"]) == ("float32", "cpu", 1)
        assert info["load_stats"] == {"tensors_read": 6, "bytes_read": 6 * 64 * 128 * 4}
        assert info["node_id"] == ray.get_runtime_context().get_node_id()
        address = ray.get(actor.address.remote(), timeout=TIMEOUT)
        assert address == info["address"] and address.startswith("127.0.0.1:")

        x = torch.randn(5, 64)
        req = expert_pb2.DispatchRequest(layer=1, expert_ids=[2], counts=[5], hidden=encode_tensor(x), step=1)
        with grpc.insecure_channel(address, options=GRPC_OPTIONS(1 << 20)) as ch:
            resp = expert_pb2_grpc.ExpertServiceStub(ch).Dispatch(req, timeout=TIMEOUT)
        # CPU GEMMs may round differently with another thread count: compare at the actor's count.
        threads = torch.get_num_threads()
        torch.set_num_threads(info["torch_threads"])
        try:
            want = ExpertWorker(str(mixtral_dir), [(1, 2)]).forward(1, [2], [5], x)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(decode_tensor(resp.output), want)
        stats = ray.get(actor.stats.remote(), timeout=TIMEOUT)
        assert stats["tokens"] == {(1, 2): 5} and stats["requests"] == {"OK": 1}
        ray.get(actor.stop.remote(), timeout=TIMEOUT)
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            expert_pb2_grpc.ExpertServiceStub(ch).Info(expert_pb2.InfoRequest(), timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        ray.kill(actor)

