"""ExpertCluster with mutual TLS on the data plane (ClusterConfig.security with cert, key, CA and server name):
greedy tokens equal the in-process model's, and a worker refuses a plaintext caller."""

import grpc
import pytest
import ray

from cluster.deployment import ClusterConfig, ExpertCluster
from model.generation import generate
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.sampling import SamplingParams
from protos import expert_pb2, expert_pb2_grpc
from protos.security import DataPlaneSecurity
from tests.workers.test_security import self_signed

PROMPTS = [list(range(5, 17)), [7, 3, 250, 11]]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def test_mutual_tls_cluster_generates_like_in_process(ray_session, tmp_path):
    ck = write_checkpoint(tmp_path / "ck", "tiny", seed=5)
    expected, _ = generate(Mixtral.from_pretrained(ck), PROMPTS, PARAMS)
    cert, key = self_signed(tmp_path, "dataplane")  # SAN localhost / 127.0.0.1; self-signed: its own CA
    # the workers bind all interfaces and advertise the node's IP, which the cert does not name: the router
    # checks the name given as --grpc-tls-server-name instead
    security = DataPlaneSecurity.generate(cert, key, cert, tls_server_name="localhost")
    with ExpertCluster(ClusterConfig(str(ck), 2, security=security)) as cluster:
        out, _ = ray.get(cluster.router.generate.remote(PROMPTS, PARAMS), timeout=120)
        addr = cluster.addresses[0]
        with grpc.insecure_channel(addr) as ch:  # plaintext to the TLS port: no answer, even with the secret
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=security.call_metadata())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert out == expected
