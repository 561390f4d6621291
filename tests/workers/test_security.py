"""The authenticated data plane on real servers: the secret interceptor (UNAUTHENTICATED without it, health
open), TLS and mutual TLS through the router's RemoteExperts, a worker on 0.0.0.0 advertising a reachable
address, and `expertmesh serve` keeping the API key out of argv, environ, output and hints."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model.random_checkpoint import write_checkpoint
from protos import expert_pb2, expert_pb2_grpc
from protos.addresses import advertised_host
from protos.codec import GRPC_OPTIONS, encode_tensor
from protos.security import SECRET_METADATA_KEY, DataPlaneSecurity
from router.remote_experts import RemoteExperts, RoutingTable
from router.server import ServerConfig
from tests.ports import free_port
from tests.processes import stop as stop_process
from workers.expert_worker import ExpertWorker
from workers.servicer import SERVICE_NAME, serve_worker

PAIRS = [(0, 1), (1, 3)]
SECRET = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def worker(mixtral_dir):
    return ExpertWorker(str(mixtral_dir), PAIRS, worker_id="sec")


def start(loop, worker, security, host="127.0.0.1"):
    srv, port = asyncio.run_coroutine_threadsafe(serve_worker(worker, host, 0, security=security), loop).result(30)
    return srv, port


def stop(loop, srv):
    asyncio.run_coroutine_threadsafe(srv.stop(1), loop).result(30)


@pytest.fixture(scope="module")
def secured(loop, worker):
    srv, port = start(loop, worker, DataPlaneSecurity(SECRET))
    yield f"127.0.0.1:{port}"
    stop(loop, srv)


def dispatch_request():
    return expert_pb2.DispatchRequest(layer=1, expert_ids=[3], counts=[2], hidden=encode_tensor(torch.randn(2, 64)))


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_expert_service_needs_the_secret_health_does_not(secured):
    with grpc.insecure_channel(secured, options=GRPC_OPTIONS()) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        for md in [(), ((SECRET_METADATA_KEY, "wrong"),), ((SECRET_METADATA_KEY, SECRET[:-1]),)]:
            assert code_of(lambda md=md: stub.Dispatch(dispatch_request(), timeout=10, metadata=md)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda md=md: stub.Info(expert_pb2.InfoRequest(), timeout=10, metadata=md)) \
                == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Info(expert_pb2.InfoRequest(), timeout=10)
        assert SECRET_METADATA_KEY in e.value.details() and SECRET not in e.value.details()
        good = ((SECRET_METADATA_KEY, SECRET),)
        reply = stub.Dispatch(dispatch_request(), timeout=10, metadata=good)
        assert list(reply.output.shape) == [2, 64]
        assert stub.Info(expert_pb2.InfoRequest(), timeout=10, metadata=good).worker_id == "sec"
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_router_backend_sends_the_secret(secured, mixtral_dir):
    table = RoutingTable.from_pairs([PAIRS], [secured], ["sec"])
    for security, answers in [(DataPlaneSecurity(SECRET), True), (DataPlaneSecurity("other"), False), (None, False)]:
        backend = RemoteExperts(table, num_experts=8, security=security)
        try:
            assert (backend.unreachable(timeout_s=10) == []) is answers
        finally:
            backend.close()


def test_secret_and_keys_stay_out_of_reprs():
    sec = DataPlaneSecurity.generate(tls_server_name="expertmesh-worker")
    assert sec.secret not in repr(sec) and len(sec.secret) >= 32
    assert DataPlaneSecurity.generate().secret != sec.secret
    assert "k3y" not in repr(ServerConfig(api_key="k3y"))
    with pytest.raises(ValueError, match="--grpc-tls-key"):
        DataPlaneSecurity("s", tls_cert=b"cert")
    with pytest.raises(ValueError, match="--grpc-tls-ca needs"):
        DataPlaneSecurity("s", tls_ca=b"ca")


def self_signed(tmp_path, name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 / localhost (openssl CLI), as (cert, key) PEM bytes."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed (needed to make a test certificate)")
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=expertmesh-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_round_trip(loop, worker, tmp_path, mutual):
    cert, key = self_signed(tmp_path, "worker")
    sec = DataPlaneSecurity(SECRET, cert, key, cert if mutual else None)  # self-signed: its own CA
    srv, port = start(loop, worker, sec)
    addr = f"127.0.0.1:{port}"
    try:
        backend = RemoteExperts(RoutingTable.from_pairs([PAIRS], [addr], ["sec"]), num_experts=8, security=sec)
        try:
            assert backend.unreachable(timeout_s=10) == []
            assert backend.infos([addr], timeout_s=10)[addr].worker_id == "sec"
        finally:
            backend.close()
        with grpc.insecure_channel(addr) as ch:  # plaintext to a TLS port: no answer
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            md = ((SECRET_METADATA_KEY, SECRET),)
            assert code_of(lambda: stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=md)) \
                == grpc.StatusCode.UNAVAILABLE
        other_cert, other_key = self_signed(tmp_path, "other")  # trusts another cert: the handshake fails
        with grpc.secure_channel(addr, grpc.ssl_channel_credentials(other_cert)) as ch:
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            assert code_of(lambda: stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=md)) \
                == grpc.StatusCode.UNAVAILABLE
        if mutual:  # the right server cert, but no client cert: refused
            with grpc.secure_channel(addr, grpc.ssl_channel_credentials(cert)) as ch:
                stub = expert_pb2_grpc.ExpertServiceStub(ch)
                assert code_of(lambda: stub.Info(expert_pb2.InfoRequest(), timeout=5, metadata=md)) \
                    == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(loop, srv)


def non_loopback_ip() -> str | None:
    ip = advertised_host("0.0.0.0")
    return None if ip.startswith("127.") else ip


def test_worker_on_all_interfaces_advertises_a_reachable_address(ray_session, mixtral_dir):
    from workers.actor import ExpertWorkerActor

    if non_loopback_ip() is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    sec = DataPlaneSecurity.generate()
    actor = ray_session.remote(num_cpus=1)(ExpertWorkerActor).remote(
        str(mixtral_dir), PAIRS, "float32", "wide", host="0.0.0.0", security=sec)
    try:
        info = ray_session.get(actor.info.remote(), timeout=120)
        node_ip = ray_session.util.get_node_ip_address()
        host = info["address"].rsplit(":", 1)[0]
        assert not host.startswith("127.") and host == node_ip, info["address"]
        assert info["metrics_url"].startswith(f"http://{node_ip}:")
        backend = RemoteExperts(RoutingTable.from_pairs([PAIRS], [info["address"]], ["wide"]), 8, security=sec)
        try:  # dialled on the advertised (non-loopback) address, with the secret
            assert backend.unreachable(timeout_s=10) == []
        finally:
            backend.close()
        assert httpx.get(info["metrics_url"], timeout=10).status_code == 200
    finally:
        ray_session.get(actor.stop.remote(), timeout=60)
        ray_session.kill(actor)


def children(pid: int) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(p))
        except OSError:
            pass
    return found


def test_serve_keeps_the_api_key_out_of_argv_environ_and_output(tmp_path):
    key = "sk-test-" + os.urandom(8).hex()
    ck = tmp_path / "ck"
    write_checkpoint(ck, "tiny", seed=3)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EXPERTMESH_API_KEY"}
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(ck), "--workers", "1", "--port", str(port),
           "--api-key", key, "--metrics-auth", "--prometheus-file-sd", str(tmp_path / "sd.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not any("expertmesh serving" in x for x in out):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-3000:]
            time.sleep(0.2)
        (child,) = children(proc.pid)
        with open(f"/proc/{child}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{child}/environ", "rb") as f:
            environ = f.read()
        assert b"serve" in argv and key.encode() not in b"\0".join(argv) and b"--api-key" not in argv
        assert key.encode() not in environ
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code \
            == 200
        assert httpx.get(url + "/metrics", timeout=30).status_code == 401  # --metrics-auth
        assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code \
            == 200
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        hint = next(x for x in out if x.startswith("try: curl "))
        assert '-H "Authorization: Bearer $EXPERTMESH_API_KEY"' in hint
    finally:
        stop_process(proc)
    text = "".join(out) + "".join(err)
    assert key not in text
    assert "--api-key shows the key" in text  # the warning, on stderr


def test_api_key_sources(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cluster.serve_secrets import API_KEY_ENV, resolve_api_key, strip_api_key

    assert strip_api_key(["serve", "--api-key", "k1", "--port", "1", "--api-key=k2"]) == (["serve", "--port", "1"],
                                                                                         "k2")
    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(SimpleNamespace(api_key=None, api_key_file=str(tmp_path / "key"))) == "from-file"
    assert API_KEY_ENV not in os.environ  # so that Ray's processes, started after, do not inherit it
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(SimpleNamespace(api_key=None, api_key_file=None)) == "from-env"
    with pytest.raises(ValueError, match="give one"):
        resolve_api_key(SimpleNamespace(api_key="k", api_key_file=str(tmp_path / "key")))
    with pytest.raises(ValueError, match="--api-key-file: cannot read"):
        resolve_api_key(SimpleNamespace(api_key=None, api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--metrics-auth: needs an API key"):
        ServerConfig(metrics_auth=True)


def test_standalone_worker_reads_its_secret_from_the_environment(mixtral_dir):
    env = {**os.environ, "EXPERTMESH_GRPC_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workers.standalone", "--model", str(mixtral_dir), "--experts",
                             "1,3", "--worker-id", "alone"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), proc.stderr.read()[-2000:] if proc.poll() is not None else line
        with grpc.insecure_channel(f"127.0.0.1:{int(line.split()[1])}") as ch:
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            assert code_of(lambda: stub.Info(expert_pb2.InfoRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
            md = ((SECRET_METADATA_KEY, SECRET),)
            assert stub.Info(expert_pb2.InfoRequest(), timeout=10, metadata=md).worker_id == "alone"
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert SECRET.encode() not in f.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
