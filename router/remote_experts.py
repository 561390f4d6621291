"""The remote expert backend: per MoE layer, one all-to-all batch to the expert workers over gRPC.

For each layer: sort the (token, slot) pairs by expert (as LocalExperts does), cut the sorted rows into one
request per worker that hosts a hit expert, send every request concurrently (grpc.aio), and combine the
outputs with the routing weights here: weights never cross the wire.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from model.experts import combine, sort_by_expert
from protos import expert_pb2, expert_pb2_grpc
from protos.codec import DEFAULT_MAX_MESSAGE_BYTES, GRPC_OPTIONS, decode_tensor, encode_tensor


class ExpertUnavailableError(RuntimeError):
    """No replica of an expert answered; names the layer, expert and worker."""


@dataclass(frozen=True)
class RoutingTable:
    """(layer, expert) -> replica addresses ("host:port"); the first healthy replica serves."""

    replicas: dict[tuple[int, int], tuple[str, ...]]
    names: dict[str, str] = field(default_factory=dict)  # address -> worker id, for metrics labels

    @staticmethod
    def from_placement(experts_of_worker: list[list[int]] | tuple, addresses: list[str],
                       num_layers: int, names: list[str] | None = None) -> RoutingTable:
        table: dict[tuple[int, int], tuple[str, ...]] = {}
        for experts, addr in zip(experts_of_worker, addresses, strict=True):
            for layer in range(num_layers):
                for e in experts:
                    table[(layer, e)] = table.get((layer, e), ()) + (addr,)
        return RoutingTable(table, dict(zip(addresses, names, strict=True)) if names else {})

    def name_of(self, addr: str) -> str:
        return self.names.get(addr, addr)

    def addresses(self) -> list[str]:
        return sorted({a for reps in self.replicas.values() for a in reps})

    def worker_of(self, layer: int, expert: int) -> str:
        reps = self.replicas.get((layer, expert))
        if not reps:
            raise ExpertUnavailableError(f"layer {layer} expert {expert}: no worker hosts it")
        return reps[0]


@dataclass
class DispatchStats:
    """Counters since creation; the engine reads deltas per step."""

    rpcs: int = 0
    bytes_sent: int = 0  # serialized request messages
    bytes_received: int = 0  # serialized reply messages
    tokens: int = 0  # (token, slot) pairs sent
    wall_seconds: float = 0.0  # time inside dispatch (wire + expert compute, slowest worker per layer)
    expert_seconds: float = 0.0  # expert compute of the slowest worker per layer, as reported by workers
    per_worker_tokens: dict[str, int] = field(default_factory=dict)
    per_worker_rpcs: dict[str, int] = field(default_factory=dict)
    per_worker_seconds: dict[str, float] = field(default_factory=dict)


class RemoteExperts:
    """ExpertBackend that calls expert workers; usable from any thread (gRPC runs on its own loop thread)."""

    def __init__(self, table: RoutingTable, num_experts: int, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.table = table
        self.num_experts = num_experts
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.stats = DispatchStats()
        self.step = 0
        self.on_dispatch = None  # optional callback(layer, worker, tokens, seconds, sent, received)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expert-dispatch", daemon=True)
        self._thread.start()
        self._stubs: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._run(self._connect(table.addresses()))

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, addresses: list[str]) -> None:
        for addr in addresses:
            if addr not in self._stubs:
                ch = grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS(self.max_message_bytes))
                self._channels[addr] = ch
                self._stubs[addr] = expert_pb2_grpc.ExpertServiceStub(ch)

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self.step += 1  # every forward enters layer 0 first, once
        plan = sort_by_expert(expert_ids, self.num_experts)
        x_sorted = hidden[plan.token].cpu()
        starts = [0]
        for c in plan.counts:
            starts.append(starts[-1] + c)
        groups: dict[str, list[int]] = {}
        for e, c in enumerate(plan.counts):
            if c:
                groups.setdefault(self.table.worker_of(layer, e), []).append(e)
        requests = []
        for addr, experts in groups.items():
            rows = [x_sorted[starts[e]:starts[e + 1]] for e in experts]
            x = rows[0] if len(rows) == 1 else torch.cat(rows)
            req = expert_pb2.DispatchRequest(layer=layer, expert_ids=experts,
                                             counts=[plan.counts[e] for e in experts],
                                             hidden=encode_tensor(x), step=self.step)
            requests.append((addr, experts, req))
        y_sorted = torch.empty_like(x_sorted)
        replies = self._run(self._dispatch_all(layer, requests))
        for (_, experts, _), out in zip(requests, replies, strict=True):
            offset = 0
            for e in experts:
                n = plan.counts[e]
                y_sorted[starts[e]:starts[e + 1]] = out[offset:offset + n]
                offset += n
        return combine(y_sorted.to(hidden.device), plan, weights, hidden.shape[0])

    async def _dispatch_all(self, layer: int, requests) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._dispatch_one(layer, a, e, r) for a, e, r in requests))
        self.stats.wall_seconds += time.perf_counter() - t0
        self.stats.expert_seconds += max((c for _, c in results), default=0.0)
        return [out for out, _ in results]

    async def _dispatch_one(self, layer: int, addr: str, experts: list[int], req) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        try:
            reply = await self._stubs[addr].Dispatch(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise ExpertUnavailableError(f"layer {layer} experts {experts} on worker {addr}: "
                                         f"{e.code().name}: {e.details()}") from None
        seconds = time.perf_counter() - t0
        out = decode_tensor(reply.output, expected_dtype=req.hidden.dtype, expected_shape_tail=None)
        if tuple(out.shape) != tuple(req.hidden.shape):
            raise ExpertUnavailableError(f"worker {addr} answered shape {list(out.shape)} for "
                                         f"{list(req.hidden.shape)}")
        s = self.stats
        tokens = int(req.hidden.shape[0])
        sent, received = req.ByteSize(), reply.ByteSize()  # whole messages, not just tensor bytes
        s.rpcs += 1
        s.tokens += tokens
        s.bytes_sent += sent
        s.bytes_received += received
        s.per_worker_tokens[addr] = s.per_worker_tokens.get(addr, 0) + tokens
        s.per_worker_rpcs[addr] = s.per_worker_rpcs.get(addr, 0) + 1
        s.per_worker_seconds[addr] = s.per_worker_seconds.get(addr, 0.0) + seconds
        if self.on_dispatch is not None:
            self.on_dispatch(layer, addr, experts, [c for c in req.counts], seconds, sent, received)
        return out, reply.compute_seconds

    def unreachable(self, timeout_s: float = 1.0) -> list[str]:
        """Workers that do not answer Info within timeout_s (all probed concurrently)."""
        async def probe(addr: str) -> bool:
            try:
                await self._stubs[addr].Info(expert_pb2.InfoRequest(), timeout=timeout_s)
                return True
            except grpc.aio.AioRpcError:
                return False

        async def probe_all() -> list[str]:
            addrs = self.table.addresses()
            ok = await asyncio.gather(*(probe(a) for a in addrs))
            return [a for a, good in zip(addrs, ok, strict=True) if not good]

        return self._run(probe_all(), timeout=timeout_s + 5)

    def close(self) -> None:
        async def _close():
            for ch in self._channels.values():
                await ch.close()
        if self._loop.is_running():
            self._run(_close(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
