"""The remote expert backend: per MoE layer, one all-to-all batch to the expert workers over gRPC.

For each layer: sort the (token, slot) pairs by expert (as LocalExperts does), split each expert's rows evenly
over its live replicas (deterministic: replica i of k, counted from a start that rotates with the step and
expert, gets rows [i*n//k, (i+1)*n//k)), gather each worker's pieces into one request, send every request
concurrently (grpc.aio), and combine the outputs with the routing weights here: weights never cross the wire.

Failover: an RPC that fails (UNAVAILABLE, deadline exceeded, ...) marks its worker's address down and its rows
go to the experts' other live replicas in the same forward; when an expert has no live replica left the
forward raises ExpertUnavailableError, which the engine treats as retryable (see router/expert_plane.py).
`swap_table` installs a new routing table between two forwards: a forward keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from model.experts import combine, sort_by_expert
from protos import expert_pb2, expert_pb2_grpc
from protos.codec import DEFAULT_MAX_MESSAGE_BYTES, GRPC_OPTIONS, decode_tensor, encode_tensor
from protos.security import DataPlaneSecurity, secure_channel

from .expert_plane import ExpertPlane, ExpertUnavailableError

__all__ = ["DispatchStats", "ExpertCallError", "ExpertUnavailableError", "RemoteExperts", "RoutingTable",
           "split_rows"]
log = logging.getLogger(__name__)

# Codes that say the worker (or the way to it) is gone, not that the request was bad: mark it down, go elsewhere.
PEER_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED})
DispatchListener = Callable[[int, str, list[int], list[int], float, int, int], None]


class ExpertCallError(RuntimeError):
    """A worker refused or failed a Dispatch it received (INVALID_ARGUMENT, INTERNAL): the request's fault or
    a bug, not a dead worker; the engine isolates it like any failed forward."""


@dataclass(frozen=True)
class RoutingTable:
    """(layer, expert) -> replica addresses ("host:port"); rows are split over the live ones."""

    replicas: dict[tuple[int, int], tuple[str, ...]]
    names: dict[str, str] = field(default_factory=dict)  # address -> worker id, for metrics labels

    @staticmethod
    def from_placement(experts_of_worker: list[list[int]] | tuple, addresses: list[str],
                       num_layers: int, names: list[str] | None = None) -> RoutingTable:
        pairs = [[(layer, e) for layer in range(num_layers) for e in experts] for experts in experts_of_worker]
        return RoutingTable.from_pairs(pairs, addresses, names)

    @staticmethod
    def from_pairs(worker_pairs: list[list[tuple[int, int]]], addresses: list[str],
                   names: list[str] | None = None) -> RoutingTable:
        """Worker i at addresses[i] hosts worker_pairs[i]; replicas keep the workers' order."""
        table: dict[tuple[int, int], tuple[str, ...]] = {}
        for pairs, addr in zip(worker_pairs, addresses, strict=True):
            for layer, e in pairs:
                key = (int(layer), int(e))
                if addr not in table.get(key, ()):
                    table[key] = table.get(key, ()) + (addr,)
        return RoutingTable(table, dict(zip(addresses, names, strict=True)) if names else {})

    def name_of(self, addr: str) -> str:
        return self.names.get(addr, addr)

    def addresses(self) -> list[str]:
        return sorted({a for reps in self.replicas.values() for a in reps})

    def worker_of(self, layer: int, expert: int) -> str:
        """The first replica (the one a single-replica plan routes to)."""
        reps = self.replicas.get((layer, expert))
        if not reps:
            raise ExpertUnavailableError(f"layer {layer} expert {expert}: no worker hosts it")
        return reps[0]


def split_rows(start: int, n: int, replicas: list[str], rotate: int = 0) -> list[tuple[str, int, int]]:
    """Rows [start, start+n) over the replicas: (address, first row, row count), empty pieces left out. The
    replica list is rotated by `rotate` first, so that the rounding remainder (most rows of a small decode
    batch) does not always land on the same replica."""
    k = len(replicas)
    replicas = replicas[rotate % k:] + replicas[:rotate % k]
    out = []
    for i, addr in enumerate(replicas):
        lo, hi = start + i * n // k, start + (i + 1) * n // k
        if hi > lo:
            out.append((addr, lo, hi - lo))
    return out


@dataclass
class DispatchStats:
    """Counters since creation; the engine reads deltas per step."""

    rpcs: int = 0
    bytes_sent: int = 0  # serialized request messages
    bytes_received: int = 0  # serialized reply messages
    tokens: int = 0  # (token, slot) pairs sent
    wall_seconds: float = 0.0  # time inside dispatch (wire + expert compute, slowest worker per layer)
    expert_seconds: float = 0.0  # expert compute of the slowest worker per layer, as reported by workers
    failed_rpcs: int = 0  # RPCs that found their worker gone (each marked it down)
    per_worker_tokens: dict[str, int] = field(default_factory=dict)
    per_worker_rpcs: dict[str, int] = field(default_factory=dict)
    per_worker_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Piece:
    expert: int
    start: int  # first row in the layer's sorted rows
    n: int


class _PeerDown(Exception):
    def __init__(self, addr: str, reason: str):
        super().__init__(reason)
        self.addr, self.reason = addr, reason


class RemoteExperts:
    """ExpertBackend that calls expert workers; usable from any thread (gRPC runs on its own loop thread)."""

    def __init__(self, table: RoutingTable, num_experts: int, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: DataPlaneSecurity | None = None):
        self.table = table
        self.security = security  # the deployment's secret (every ExpertService call carries it) and TLS
        self.call_metadata = security.call_metadata() if security is not None else ()
        self.num_experts = num_experts
        self.timeout_s = timeout_s  # the Dispatch deadline: a worker that misses it is treated as dead
        self.max_message_bytes = max_message_bytes
        self.stats = DispatchStats()
        self.plane = ExpertPlane()
        self.step = 0
        self.on_dispatch = None  # legacy single callback(layer, worker, experts, counts, seconds, sent, received)
        self._listeners: list[DispatchListener] = []
        self._local = threading.local()  # per forward thread: the table its forward started with
        self._swap_lock = threading.Lock()
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
                ch = secure_channel(addr, self.security, GRPC_OPTIONS(self.max_message_bytes))
                self._channels[addr] = ch
                self._stubs[addr] = expert_pb2_grpc.ExpertServiceStub(ch)

    # ---- the routing table ---------------------------------------------------------------------------------

    def add_listener(self, fn: DispatchListener) -> None:
        """fn(layer, address, experts, counts, seconds, bytes_sent, bytes_received) after each answered
        Dispatch, on the dispatch loop thread (keep it cheap)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: DispatchListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def swap_table(self, table: RoutingTable, close_grace_s: float | None = None) -> None:
        """Connect to the table's new addresses, then make it the table of every forward that starts from now
        on (one in flight finishes on its own table); channels no longer used close after close_grace_s
        (default: the Dispatch deadline), so an in-flight forward is never cut off by the swap itself."""
        self._run(self._connect(table.addresses()), timeout=30)
        with self._swap_lock:
            old = self.table
            self.table = table
            self.plane.swapped()
        gone = set(old.addresses()) - set(table.addresses())
        if gone:
            grace = self.timeout_s if close_grace_s is None else close_grace_s
            self._loop.call_soon_threadsafe(self._loop.call_later, grace,
                                            lambda: self._loop.create_task(self._close(gone)))

    async def _close(self, addresses: set[str]) -> None:
        for addr in addresses:
            if addr in self.table.addresses():  # back in a newer table
                continue
            self._stubs.pop(addr, None)
            ch = self._channels.pop(addr, None)
            if ch is not None:
                await ch.close()

    def connected(self) -> list[str]:
        return sorted(self._channels)

    # ---- one layer -----------------------------------------------------------------------------------------

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self.step += 1  # every forward enters layer 0 first, once
            with self._swap_lock:
                self._local.table = self.table
        table = getattr(self._local, "table", None) or self.table
        plan = sort_by_expert(expert_ids, self.num_experts)
        x_sorted = hidden[plan.token].cpu()
        y_sorted = torch.empty_like(x_sorted)
        pending, start = [], 0
        for e, c in enumerate(plan.counts):
            if c:
                pending.append(_Piece(e, start, c))
            start += c
        while pending:  # a second round only re-sends the rows of workers found down in the first
            requests = self._requests(layer, table, pending, x_sorted)
            results = self._run(self._dispatch_all(layer, requests))
            pending = []
            for (addr, pieces, _), out in zip(requests, results, strict=True):
                if isinstance(out, _PeerDown):
                    if self.plane.mark_down(out.addr, out.reason):
                        log.warning("expert worker %s (%s) marked down: %s", table.name_of(addr), addr, out.reason)
                    pending += pieces
                    continue
                offset = 0
                for p in pieces:
                    y_sorted[p.start:p.start + p.n] = out[offset:offset + p.n]
                    offset += p.n
        return combine(y_sorted.to(hidden.device), plan, weights, hidden.shape[0])

    def _requests(self, layer: int, table: RoutingTable, pending: list[_Piece], x_sorted: torch.Tensor):
        """[(address, pieces, DispatchRequest)]: one request per worker, unless a re-sent expert's rows land
        on a worker twice in one round (then that worker gets a second request)."""
        by_addr: dict[str, list[list[_Piece]]] = {}
        for p in pending:
            reps = table.replicas.get((layer, p.expert), ())
            live = [a for a in reps if not self.plane.is_down(a)]
            if not live:
                why = "; ".join(f"{table.name_of(a)} ({a}): {self.plane.down.get(a, '?')}" for a in reps)
                raise ExpertUnavailableError(f"layer {layer} expert {p.expert}: no live replica "
                                             f"({why or 'no worker hosts it'})")
            for addr, lo, n in split_rows(p.start, p.n, live, rotate=self.step + p.expert):
                reqs = by_addr.setdefault(addr, [[]])
                if any(q.expert == p.expert for q in reqs[-1]):
                    reqs.append([])
                reqs[-1].append(_Piece(p.expert, lo, n))
        out = []
        for addr, groups in by_addr.items():
            for pieces in groups:
                rows = [x_sorted[p.start:p.start + p.n] for p in pieces]
                x = rows[0] if len(rows) == 1 else torch.cat(rows)
                req = expert_pb2.DispatchRequest(layer=layer, expert_ids=[p.expert for p in pieces],
                                                 counts=[p.n for p in pieces], hidden=encode_tensor(x),
                                                 step=self.step)
                out.append((addr, pieces, req))
        return out

    async def _dispatch_all(self, layer: int, requests) -> list[torch.Tensor | _PeerDown]:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._dispatch_one(layer, a, r) for a, _, r in requests),
                                       return_exceptions=True)
        self.stats.wall_seconds += time.perf_counter() - t0
        outs, compute = [], 0.0
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, _PeerDown):
                raise r
            if isinstance(r, _PeerDown):
                outs.append(r)
            else:
                outs.append(r[0])
                compute = max(compute, r[1])
        self.stats.expert_seconds += compute
        return outs

    async def _dispatch_one(self, layer: int, addr: str, req) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        experts = list(req.expert_ids)
        stub = self._stubs.get(addr)
        if stub is None:
            raise _PeerDown(addr, "not connected")
        try:
            reply = await stub.Dispatch(req, timeout=self.timeout_s, metadata=self.call_metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() in PEER_FAILURE_CODES:
                self.stats.failed_rpcs += 1
                raise _PeerDown(addr, f"Dispatch of layer {layer} experts {experts}: {e.code().name}: "
                                      f"{e.details()}") from None
            raise ExpertCallError(f"layer {layer} experts {experts} on worker {addr}: "
                                  f"{e.code().name}: {e.details()}") from None
        seconds = time.perf_counter() - t0
        out = decode_tensor(reply.output, expected_dtype=req.hidden.dtype, expected_shape_tail=None)
        if tuple(out.shape) != tuple(req.hidden.shape):
            raise ExpertCallError(f"worker {addr} answered shape {list(out.shape)} for {list(req.hidden.shape)}")
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
        counts = list(req.counts)
        if self.on_dispatch is not None:
            self.on_dispatch(layer, addr, experts, counts, seconds, sent, received)
        for fn in self._listeners:
            fn(layer, addr, experts, counts, seconds, sent, received)
        return out, reply.compute_seconds

    # ---- probes --------------------------------------------------------------------------------------------

    def unreachable(self, timeout_s: float = 1.0) -> list[str]:
        """Workers of the table that are marked down or do not answer Info within timeout_s (probed
        concurrently)."""
        async def probe(addr: str) -> bool:
            stub = self._stubs.get(addr)
            if stub is None or self.plane.is_down(addr):
                return False
            try:
                await stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s, metadata=self.call_metadata)
                return True
            except grpc.aio.AioRpcError:
                return False

        async def probe_all() -> list[str]:
            addrs = self.table.addresses()
            ok = await asyncio.gather(*(probe(a) for a in addrs))
            return [a for a, good in zip(addrs, ok, strict=True) if not good]

        return self._run(probe_all(), timeout=timeout_s + 5)

    def infos(self, addresses: list[str], timeout_s: float = 2.0) -> dict[str, expert_pb2.InfoResponse]:
        """Info of each connected address that answers within timeout_s (asked concurrently); others left out."""
        async def ask(addr: str):
            stub = self._stubs.get(addr)  # None: not connected (or closed by a table swap)
            try:
                return addr, None if stub is None else await stub.Info(
                    expert_pb2.InfoRequest(), timeout=timeout_s, metadata=self.call_metadata)
            except grpc.aio.AioRpcError:
                return addr, None

        async def ask_all():
            return await asyncio.gather(*(ask(a) for a in addresses))

        return {a: info for a, info in self._run(ask_all(), timeout=timeout_s + 5) if info is not None}

    def close(self) -> None:
        async def _close():
            for ch in list(self._channels.values()):
                await ch.close()
        if self._loop.is_running():
            self._run(_close(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
