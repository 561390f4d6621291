"""The router actor's server over live expert workers: /health follows the workers, a dead worker fails only the
requests that needed it with a clear error, and shutdown leaves no actor or port behind."""

import os
import socket
import time

import httpx
import pytest
import ray
import ray._private.state as ray_state  # GCS actor table (the state API needs the dashboard)

from cluster.deployment import ClusterConfig, ExpertCluster
from router.scheduler import EngineConfig
from router.server import ServerConfig
from tests.model.hf_reference import write_hf_checkpoint


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    write_hf_checkpoint(d, seed=8)
    from model.tokenizer import build_byte_level_bpe, write_tokenizer_files
    write_tokenizer_files(d, build_byte_level_bpe(300), 1, 2, 512)
    return d


def test_health_follows_workers_and_shutdown_is_clean(ray_session, ck):
    cluster = ExpertCluster(ClusterConfig(str(ck), 2))
    try:
        url = ray.get(cluster.router.start_server.remote(ServerConfig(port=0, engine=EngineConfig(num_kv_blocks=64))))
        body = {"model": ck.name, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

        ray.kill(cluster.workers[1])  # a node dies; /health notices within its probe interval
        deadline = time.monotonic() + 15
        while httpx.get(url + "/health", timeout=30).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 with a dead expert worker"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code >= 500
        assert "worker" in r.text  # the error names what is unreachable
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # the server itself lives on
        addresses = list(cluster.addresses)
        router_pid = ray.get(cluster.router.info.remote())["pid"]
    finally:
        cluster.shutdown()
    assert not port_open(addresses[0])
    assert not port_open(url.removeprefix("http://"))
    alive = [a for a in ray_state.actors().values() if a["State"] == "ALIVE"
             and a["ActorClassName"] in ("ExpertWorkerActor", "RouterActor")]
    assert alive == []
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{router_pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{router_pid}"), "router process still running after shutdown"
