"""gRPC face of an ExpertWorker: a grpc.aio server with ExpertService and the standard health service."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import expert_pb2, expert_pb2_grpc
from protos.codec import DEFAULT_MAX_MESSAGE_BYTES, GRPC_OPTIONS, decode_tensor, dtype_name, encode_tensor
from protos.security import DataPlaneSecurity, SecretInterceptor

from .expert_worker import ExpertWorker

log = logging.getLogger(__name__)
SERVICE_NAME = "expertmesh.v1.ExpertService"


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Decode, worker.forward, encode. Compute runs on one worker thread so the event loop keeps answering
    health and Info calls meanwhile; torch parallelizes inside each call."""

    def __init__(self, worker: ExpertWorker, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 metrics_url: str = ""):
        self.worker = worker
        self.max_message_bytes = max_message_bytes
        self.metrics_url = metrics_url
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-{worker.worker_id}")

    def _dispatch(self, request: expert_pb2.DispatchRequest) -> tuple[grpc.StatusCode, object]:
        """(OK, response) or (error code, message); runs on the compute thread, which owns worker.stats."""
        w = self.worker
        try:
            hidden = decode_tensor(request.hidden)
            ids, counts = list(request.expert_ids), list(request.counts)
            y, seconds = w.forward_timed(request.layer, ids, counts, hidden)
            result = grpc.StatusCode.OK, expert_pb2.DispatchResponse(output=encode_tensor(y),
                                                                      compute_seconds=seconds)
        except ValueError as e:
            result = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:  # a bug or a device failure: report it, keep serving
            log.exception("worker %s: Dispatch failed", w.worker_id)
            result = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        w.stats.count_request(result[0].name)
        return result

    async def Dispatch(self, request, context):
        code, result = await asyncio.get_running_loop().run_in_executor(self._pool, self._dispatch, request)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, result)
        return result

    async def Info(self, request, context):
        w = self.worker
        return expert_pb2.InfoResponse(
            worker_id=w.worker_id, dtype=dtype_name(w.dtype), device=str(w.device), hidden_size=w.hidden_size,
            experts=[expert_pb2.ExpertKey(layer=layer, expert=e) for layer, e in w.pairs],
            max_message_bytes=self.max_message_bytes, metrics_url=self.metrics_url)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class BindError(OSError):
    """The gRPC server cannot listen on the address it was given."""


async def serve_worker(worker: ExpertWorker, host: str = "127.0.0.1", port: int = 0,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       metrics_url: str = "", security: DataPlaneSecurity | None = None
                       ) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `worker` in the running event loop; port 0 picks a free one. With
    `security`, ExpertService calls need its secret (health stays open) and it serves TLS if it has a cert."""
    interceptors = [SecretInterceptor(security.secret)] if security is not None else []
    server = grpc.aio.server(options=GRPC_OPTIONS(max_message_bytes), interceptors=interceptors)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(
        ExpertServicer(worker, max_message_bytes, metrics_url), server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = security.server_credentials() if security is not None else None
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # grpcio raises RuntimeError (older ones return 0) when the address is not this host's
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise BindError(f"worker {worker.worker_id}: cannot bind {address} (not an address of this host?)")
    await server.start()
    return server, bound
