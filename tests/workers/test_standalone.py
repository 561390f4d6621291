"""`python -m workers.standalone`: plain worker processes (no Ray) serve the model's experts over gRPC; a router
using them generates exactly the in-process model's tokens and logits; Info, metrics and SIGTERM behave."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from model.generation import generate
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.sampling import SamplingParams
from router.remote_experts import RemoteExperts, RoutingTable
from tests.scrape import by, scrape, total

GROUPS = [[0, 2, 4, 6], [1, 3, 5, 7]]
PROMPTS = [[1, 5, 9, 200, 31], [1, 300, 2, 77, 8, 8, 8, 410]]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def start_worker(model_dir, experts: list[int], worker_id: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "workers.standalone", "--model", str(model_dir), "--experts",
                             ",".join(map(str, experts)), "--dtype", "bfloat16", "--worker-id", worker_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until it serves (or exits: then the line is empty)
    if not line.startswith("PORT "):
        proc.kill()
        pytest.fail(f"worker {worker_id} did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, int(line.split()[1])


def test_standalone_workers_serve_the_experts_bit_for_bit(tmp_path):
    d = write_checkpoint(tmp_path / "ck", "tiny", seed=4)
    local = Mixtral.from_pretrained(d, dtype="bfloat16")
    want_tokens, want_logits = generate(local, PROMPTS, PARAMS, return_logits=True)
    procs = []
    try:
        for w, experts in enumerate(GROUPS):
            procs.append(start_worker(d, experts, f"sw{w}"))
        addrs = [f"127.0.0.1:{port}" for _, port in procs]
        backend = RemoteExperts(RoutingTable.from_placement(GROUPS, addrs, local.cfg.num_hidden_layers), 8)
        try:
            remote = Mixtral.from_pretrained(d, dtype="bfloat16", experts=backend)
            tokens, logits = generate(remote, PROMPTS, PARAMS, return_logits=True)
            infos = backend.infos(addrs, timeout_s=10)
        finally:
            backend.close()
        assert tokens == want_tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
        for w, addr in enumerate(addrs):
            info = infos[addr]
            assert (info.worker_id, info.dtype, info.device) == (f"sw{w}", "bfloat16", "cpu")
            assert sorted((k.layer, k.expert) for k in info.experts) == [(lay, e) for lay in (0, 1)
                                                                        for e in GROUPS[w]]
            m = scrape(info.metrics_url)
            hosted = by(m, "expertmesh_worker_expert_tokens_total", "layer", "expert", worker=f"sw{w}")
            assert set(hosted) == {(str(lay), str(e)) for lay in (0, 1) for e in GROUPS[w]}
            assert sum(hosted.values()) > 0 and total(m, "expertmesh_worker_requests_total", code="OK") > 0
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    for proc, _ in procs:  # SIGTERM stops it gracefully, with exit status 0
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    assert time.monotonic() - t0 < 30
