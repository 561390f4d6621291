"""Kill a random expert worker on a schedule, through Ray (for `loadtest --kill-worker-every` and the failover bench).

`serve` names its worker actors "expertmesh-<cluster>-<worker id>-<n>" in the "expertmesh" Ray namespace; the
killer joins the serve's Ray cluster (its GCS address, printed by serve as `ray: ...`), lists those names and
`ray.kill`s one at random: the process exits at once, as with `kill -9`, and the serve's controller replaces it.
A Ray that wants a token (Ray's default for a local cluster) needs RAY_AUTH_MODE=token, and the token in
RAY_AUTH_TOKEN or ~/.ray/auth_token (where the serve's embedded Ray wrote it, on the same machine).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field

import ray

from cluster.deployment import WORKER_NAMESPACE
from cluster.ray_runtime import check_ray_auth

WORKER_PREFIX = "expertmesh-"
PING_TIMEOUT_S = 2.0


@dataclass
class WorkerKiller:
    every_s: float
    ray_address: str | None = None  # None: this process is already connected (the bench)
    seed: int = 0
    kills: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, actor name)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.every_s > 0:
            raise ValueError(f"--kill-worker-every: must be positive, got {self.every_s}")
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        if ray.is_initialized():
            return
        if not self.ray_address:
            raise ValueError("--ray-address: needed with --kill-worker-every (serve prints it as `ray: HOST:PORT`)")
        host, _, port = self.ray_address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=PING_TIMEOUT_S * 2).close()
        except (OSError, ValueError):
            raise ValueError(f"--ray-address: no Ray GCS answers at {self.ray_address!r} (expected the HOST:PORT "
                             "that serve prints as `ray: ...`)") from None
        check_ray_auth(self.ray_address)  # RayAuthError: one line on RAY_AUTH_MODE / RAY_AUTH_TOKEN
        ray.init(address=self.ray_address, namespace=WORKER_NAMESPACE, log_to_driver=False)

    def workers(self) -> list[str]:
        """Names of the live expert worker actors."""
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(n["name"] for n in names
                      if n["namespace"] == WORKER_NAMESPACE and n["name"].startswith(WORKER_PREFIX))

    def kill_one(self) -> str | None:
        """Kill a random serving worker (one that answers a ping: a replacement still starting is spared)."""
        names = self.workers()
        self._rng.shuffle(names)
        for name in names:
            try:
                actor = ray.get_actor(name, namespace=WORKER_NAMESPACE)
                ray.get(actor.ping.remote(), timeout=PING_TIMEOUT_S)
            except (ValueError, ray.exceptions.RayError):  # gone, or not serving (yet)
                continue
            ray.kill(actor, no_restart=True)
            self.kills.append((time.monotonic(), name))
            return name
        self.errors.append("no serving expert worker to kill")
        return None

    def start(self) -> WorkerKiller:
        self.connect()
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.kill_one()

    def summary(self) -> dict:
        return {"kill_worker_every_s": self.every_s, "kills": len(self.kills),
                "killed": [name for _, name in self.kills], "kill_errors": list(self.errors)}
