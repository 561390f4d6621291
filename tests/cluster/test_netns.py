"""A real two-node Ray cluster on one machine: the host, and a network namespace joined to it by a veth pair,
each node with its own IP. `expertmesh serve --pg-strategy SPREAD --host 0.0.0.0` across both must put a worker
on each node, advertise reachable addresses (printed URL, file_sd) and answer exactly as the in-process model;
joining without the cluster's Ray token fails with one line naming RAY_AUTH_MODE / RAY_AUTH_TOKEN.

Needs root and `ip netns` (skips otherwise). Everything started here carries a marker in its environment, and
teardown kills exactly those processes (never `ray stop`, which would stop other Ray sessions on the machine),
then removes the veth pair and the namespace."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from model.random_checkpoint import write_checkpoint
from tests.ports import free_port
from tests.processes import stop

RAY = str(Path(sys.executable).parent / "ray")
MARKER = "EXPERTMESH_NETNS_TEST"
PROMPT_IDS = [1, 17, 42, 99, 7, 250]
NEW_TOKENS = 8
STARTUP_S = 300
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # `ray start --head` overwrites it: restored after


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates a network namespace and a veth pair)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2; dev.py test installs it as root)"
    if _ip("netns", "list", check=False).returncode != 0:
        return "`ip netns` does not work here"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _free_subnet() -> str:
    """A 10.231.N.0/24 that no interface uses yet (prefix '10.231.N.')."""
    used = _ip("-4", "-o", "addr").stdout
    for n in range(256):
        if f" 10.231.{n}." not in used:
            return f"10.231.{n}."
    pytest.skip("every 10.231.N.0/24 is in use on this machine")


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries our marker (Ray passes its environment down to every process)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"{MARKER}={marker}".encode() in f.read().split(b"\0"):
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _wait(what: str, cond, timeout_s: float, logs=()):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{Path(p).read_text()[-2000:]}" for p in logs if Path(p).exists())
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.5)


def _alive_nodes(address: str, env: dict) -> list[str]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print('NODES ' + json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
    out = subprocess.run([sys.executable, "-c", code % address], capture_output=True, text=True, env=env, timeout=120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("NODES ")), None)
    return json.loads(line[6:]) if line else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tag = f"emtest-{os.getpid()}"
    host_if, ns_if = f"emh{os.getpid() % 10**6}", f"emn{os.getpid() % 10**6}"
    prefix = _free_subnet()
    head_ip, node_ip = prefix + "1", prefix + "2"
    work = Path(tempfile.mkdtemp(prefix="emnetns-"))  # short: Ray's socket paths live under its temp dir
    logs = tmp_path_factory.mktemp("netns-logs")
    token = secrets.token_hex(32)
    env = {**os.environ, MARKER: tag, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    saved_current = CURRENT_CLUSTER.read_bytes() if CURRENT_CLUSTER.exists() else None
    procs: list[subprocess.Popen] = []
    try:
        _ip("netns", "add", tag)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", tag)
        _ip("addr", "add", f"{head_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", tag, "ip", "addr", "add", f"{node_ip}/24", "dev", ns_if)
        _ip("netns", "exec", tag, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", tag, "ip", "link", "set", "lo", "up")
        port = free_port(head_ip)
        address = f"{head_ip}:{port}"
        common = ["--num-cpus", "2", "--disable-usage-stats", "--block"]
        with open(logs / "head.log", "w") as log:
            procs.append(subprocess.Popen(
                [RAY, "start", "--head", "--node-ip-address", head_ip, "--port", str(port), "--include-dashboard",
                 "false", "--temp-dir", str(work / "head"), *common],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        def head_listens() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((head_ip, port)) == 0

        _wait("the Ray head's GCS port", head_listens, STARTUP_S, [logs / "head.log"])
        with open(logs / "node.log", "w") as log:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", tag, RAY, "start", "--address", address, "--node-ip-address", node_ip,
                 "--temp-dir", str(work / "node"), *common],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        nodes = _wait("both Ray nodes alive", lambda: (n := _alive_nodes(address, env)) == sorted([head_ip, node_ip])
                      and n, STARTUP_S, [logs / "head.log", logs / "node.log"])
        ck = work / "ck"
        write_checkpoint(ck, "tiny", seed=5)
        yield {"address": address, "env": env, "ns": tag, "ips": (head_ip, node_ip), "nodes": nodes, "model": ck,
               "logs": logs}
    finally:
        for p in procs:  # the `ray start --block` parents and their process groups
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ns_pids = _ip("netns", "pids", tag, check=False).stdout.split()
        _kill(int(p) for p in ns_pids)
        _kill(_marked_pids(tag))  # raylet workers, agents, the serve processes: all carry the marker
        deadline = time.monotonic() + 30
        while (left := _marked_pids(tag)) and time.monotonic() < deadline:  # whatever started meanwhile
            _kill(left)
            time.sleep(0.5)
        for p in procs:
            p.wait()  # reaped: SIGKILLed above
        _ip("link", "del", host_if, check=False)  # removes its peer too
        _ip("netns", "del", tag, check=False)
        if saved_current is not None:
            CURRENT_CLUSTER.write_bytes(saved_current)
        elif CURRENT_CLUSTER.exists():
            CURRENT_CLUSTER.unlink()
        shutil.rmtree(work, ignore_errors=True)


def test_join_without_the_ray_token_is_one_clear_line(two_nodes):
    env = {k: v for k, v in two_nodes["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(two_nodes["logs"])  # no ~/.ray/auth_token there
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--model", str(two_nodes["model"]),
                        "--address", two_nodes["address"]], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and two_nodes["address"] in line


def test_serve_spans_both_nodes(two_nodes):
    head_ip, node_ip = two_nodes["ips"]
    file_sd = two_nodes["logs"] / "file_sd.json"
    port = free_port("0.0.0.0")
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(two_nodes["model"]), "--workers", "2",
           "--address", two_nodes["address"], "--pg-strategy", "SPREAD", "--host", "0.0.0.0", "--port", str(port),
           "--prometheus-file-sd", str(file_sd)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=two_nodes["env"])
    out: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        def serving():
            assert proc.poll() is None, "".join(err)[-3000:]
            return next((x for x in out if x.startswith("expertmesh serving")), None)

        line = _wait("serve to start", serving, STARTUP_S)
        url = line.rsplit(" at ", 1)[1].strip()
        assert url in (f"http://{head_ip}:{port}", f"http://{node_ip}:{port}"), line  # never 0.0.0.0
        groups = json.loads(file_sd.read_text())
        worker_hosts = sorted(t.rsplit(":", 1)[0] for g in groups if g["labels"]["job"] == "expertmesh-worker"
                              for t in g["targets"])
        assert worker_hosts == sorted([head_ip, node_ip]), groups  # one worker per node, each at its node's IP
        in_ns = [_cmdline(p) for p in _ip("netns", "pids", two_nodes["ns"]).stdout.split()]
        assert any("ExpertWorkerActor" in c for c in in_ns), "no worker process inside the namespace"
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        body = {"model": two_nodes["model"].name, "prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["text"]
    finally:
        stop(proc)
    local = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model", str(two_nodes["model"]),
                            "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--max-tokens", str(NEW_TOKENS),
                            "--ignore-eos", "--local", "--json"], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    assert served == json.loads(local.stdout.strip().splitlines()[-1])["text"]
