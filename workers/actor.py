"""Ray actor that owns one ExpertWorker and serves it over gRPC from its own event-loop thread.

Use as `ray.remote(num_cpus=1)(ExpertWorkerActor).remote(...)`, or with
`.options(num_gpus=..., scheduling_strategy=PlacementGroupSchedulingStrategy(...))`. The methods are sync,
so Ray runs it as a normal actor while the grpc.aio server lives on the actor's own event-loop thread.
"""

from __future__ import annotations

import asyncio
import os
import threading

import ray
import torch

from protos.addresses import advertised_host
from protos.codec import DEFAULT_MAX_MESSAGE_BYTES, dtype_name
from protos.security import DataPlaneSecurity

from .expert_worker import ExpertWorker
from .metrics import start_metrics_server
from .servicer import serve_worker

START_TIMEOUT_S = 60.0


class BindHostError(ValueError):
    """A worker cannot listen on its bind host (`serve --bind-host`): one line naming the flag and address."""


def bind_host_error(host: str, cause: OSError) -> BindHostError:
    reason = cause.strerror or str(cause)
    return BindHostError(f"--bind-host {host}: the expert worker on node {ray.util.get_node_ip_address()} cannot "
                         f"listen there ({reason}); give an address of that node, or 0.0.0.0 (all interfaces)")


class ExpertWorkerActor:
    def __init__(self, model_dir: str, pairs: list[tuple[int, int]], dtype: str, worker_id: str,
                 host: str = "127.0.0.1", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 expert_metrics: bool = True, security: DataPlaneSecurity | None = None):
        """host: the interface to bind ("0.0.0.0": all; other nodes then dial this node's IP); security: the
        deployment's secret (and TLS), passed as an actor argument, never argv or env."""
        ctx = ray.get_runtime_context()
        torch.set_num_threads(max(1, int(ctx.get_assigned_resources().get("CPU", 1))))
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.worker = ExpertWorker(model_dir, pairs, dtype=dtype, device=device, worker_id=worker_id)
        self.node_id = ctx.get_node_id()
        advertised = advertised_host(host)
        self.server, self.start_error = None, None
        try:
            self.metrics_server, metrics_port = start_metrics_server(self.worker, host, 0, expert_metrics)
        except OSError as e:  # e.g. an address of another node. Not raised here: Ray would print a traceback
            self.start_error = bind_host_error(host, e)  # for a failed constructor; address() raises it instead
            return
        self.metrics_url = f"http://{advertised}:{metrics_port}/metrics"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"grpc-{worker_id}", daemon=True)
        self.thread.start()
        start = serve_worker(self.worker, host, 0, max_message_bytes, self.metrics_url, security)
        try:
            self.server, port = asyncio.run_coroutine_threadsafe(start, self.loop).result(timeout=START_TIMEOUT_S)
        except OSError as e:
            self.metrics_server.shutdown()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.start_error = bind_host_error(host, e)
            return
        self._address = f"{advertised}:{port}"

    def address(self) -> str:
        """The gRPC address once serving (the readiness call); BindHostError when the servers could not start."""
        if self.start_error is not None:
            raise self.start_error
        return self._address

    def info(self) -> dict:
        w, ls = self.worker, self.worker.load_stats
        return {"worker_id": w.worker_id, "pairs": list(w.pairs), "dtype": dtype_name(w.dtype),
                "device": str(w.device), "node_id": self.node_id, "pid": os.getpid(),
                "address": self._address, "metrics_url": self.metrics_url, "torch_threads": torch.get_num_threads(),
                "load_stats": {"tensors_read": ls.tensors_read, "bytes_read": ls.bytes_read}}

    def stats(self) -> dict:
        return self.worker.stats.to_dict()

    def add_experts(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Load these (layer, expert) pairs while serving (make before break); returns the ones loaded."""
        return self.worker.add_experts([tuple(p) for p in pairs])

    def drop_experts(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Free these pairs; call only after the router stopped routing them here."""
        return self.worker.drop_experts([tuple(p) for p in pairs])

    def ping(self) -> bool:
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish (up to grace_s), then end the loop thread."""
        if self.server is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self.loop).result(timeout=grace_s + 10)
        self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.metrics_server.shutdown()
        self.metrics_server.server_close()
