"""The remote expert backend: per MoE layer, one all-to-all batch to the expert workers over gRPC.

For each layer: sort the (token, slot) pairs by expert (as LocalExperts does), split each expert's rows evenly
over its live replicas (deterministic: replica i of k, counted from a start that rotates with the step and
expert, gets rows [i*n//k, (i+1)*n//k)), gather each worker's pieces into one request, send every request
concurrently from the calling thread (futures of sync stubs: no hop to an event-loop thread and back),
and combine the outputs with the routing weights here: weights never cross the wire.

Failover: an RPC that fails (UNAVAILABLE, deadline exceeded, ...) marks its worker's address down and its rows
go to the experts' other live replicas in the same forward; when an expert has no live replica left the
forward raises ExpertUnavailableError, which the engine treats as retryable (see router/expert_plane.py).
`swap_table` installs a new routing table between two forwards: a forward keeps the table it started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model.experts import DispatchOrder, combine, sort_by_expert
from protos import expert_pb2, expert_pb2_grpc
from protos.codec import DEFAULT_MAX_MESSAGE_BYTES, GRPC_OPTIONS, decode_tensor, encode_tensor
from protos.security import DataPlaneSecurity, secure_channel

from .expert_plane import ExpertPlane, ExpertUnavailableError

__all__ = ["DispatchStats", "ExpertCallError", "ExpertUnavailableError", "PendingLayer", "RemoteExperts",
           "RoutingTable", "split_rows"]
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


class _Call:
    """One Dispatch: its worker, pieces and request; sent either as a future (completed by gRPC's channel
    thread) or, the last of a round, as a blocking call on the waiting thread (no thread hop at all: at batch 1
    a layer is often a single Dispatch). t0 when sent, t1 when answered."""

    __slots__ = ("addr", "error", "future", "pieces", "reply", "req", "rows", "stub", "t0", "t1")

    def __init__(self, addr: str, pieces: list[_Piece], req: expert_pb2.DispatchRequest, rows: int, stub):
        self.addr, self.pieces, self.req, self.rows, self.stub = addr, pieces, req, rows, stub
        self.future = self.reply = self.error = None
        self.t0 = self.t1 = 0.0

    def done(self, _future) -> None:
        self.t1 = time.perf_counter()

    def send(self, timeout_s: float, metadata, block: bool) -> None:
        self.t0 = time.perf_counter()
        if not block:
            self.future = self.stub.Dispatch.future(self.req, timeout=timeout_s, metadata=metadata)
            self.future.add_done_callback(self.done)
            return
        try:
            self.reply = self.stub.Dispatch(self.req, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            self.error = e
        self.t1 = time.perf_counter()

    def result(self) -> expert_pb2.DispatchResponse:
        """The reply; raises grpc.RpcError (or FutureCancelledError) as the call ended."""
        if self.future is not None:
            return self.future.result()
        if self.error is not None:
            raise self.error
        return self.reply

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()


@dataclass
class PendingLayer:
    """One layer's dispatch in flight: what `RemoteExperts.wait` needs to collect and combine it."""

    layer: int
    table: RoutingTable  # the table its forward started with
    plan: DispatchOrder
    x_sorted: torch.Tensor  # [T*k, D] the rows sent, sorted by expert
    weights: torch.Tensor  # [T, k] routing weights (never sent)
    device: torch.device
    calls: list[_Call] = field(default_factory=list)


def _adjacent(pieces: list[_Piece]) -> bool:
    return all(a.start + a.n == b.start for a, b in zip(pieces, pieces[1:], strict=False))


def _covers(pieces: list[_Piece], rows: int) -> bool:
    """The pieces are rows [0, rows) in order."""
    return bool(pieces) and pieces[0].start == 0 and _adjacent(pieces) and pieces[-1].start + pieces[-1].n == rows


class RemoteExperts:
    """ExpertBackend that calls expert workers; usable from any thread.

    Dispatch runs on the calling thread: sync gRPC stubs, one `.future()` Dispatch per worker issued at once, then
    waited for (no hop to another thread and back per layer). `submit` + `wait` split a layer's dispatch so the
    caller can compute something else (the other micro-batch's attention) while the workers run experts."""

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
        self._listeners: list[DispatchListener] = []
        self._local = threading.local()  # per forward thread: the table its forward started with
        self._swap_lock = threading.Lock()
        self._stubs: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._watches: dict[str, grpc.Future] = {}  # per channel: a health Watch held open (see _hold_open)
        self._timers: list[threading.Timer] = []  # pending closes of channels a swap left unused
        self._closed = False
        self._connect(table.addresses())

    def _connect(self, addresses: list[str]) -> None:
        for addr in addresses:
            if addr not in self._stubs:
                ch = secure_channel(addr, self.security, GRPC_OPTIONS(self.max_message_bytes))
                self._channels[addr] = ch
                self._stubs[addr] = expert_pb2_grpc.ExpertServiceStub(ch)
                self._hold_open(addr)

    def _hold_open(self, addr: str) -> None:
        """Keep one call open on the channel: a health Watch, never read. gRPC's sync channel runs a thread
        while it has calls in flight and ends it when the last one completes, so without an open call every
        layer's `.future()` Dispatch started a new thread (1.65 ms per layer at batch 64, bench preset, 2
        workers, 2-core AMX Xeon). Reopened when it ended (a worker restarted on the same address)."""
        watch, channel = self._watches.get(addr), self._channels.get(addr)
        if channel is not None and (watch is None or watch.done()):
            self._watches[addr] = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

    # ---- the routing table ---------------------------------------------------------------------------------

    def add_listener(self, fn: DispatchListener) -> None:
        """fn(layer, address, experts, counts, seconds, bytes_sent, bytes_received) after each answered
        Dispatch, on the forward's thread (keep it cheap)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: DispatchListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def swap_table(self, table: RoutingTable, close_grace_s: float | None = None) -> None:
        """Connect to the table's new addresses, then make it the table of every forward that starts from now
        on (one in flight finishes on its own table); channels no longer used close after close_grace_s
        (default: the Dispatch deadline), so an in-flight forward is never cut off by the swap itself."""
        with self._swap_lock:
            self._connect(table.addresses())
            old = self.table
            self.table = table
            self.plane.swapped()
            gone = set(old.addresses()) - set(table.addresses())
            if gone and not self._closed:
                grace = self.timeout_s if close_grace_s is None else close_grace_s
                timer = threading.Timer(grace, self._close, args=(gone,))
                timer.daemon = True
                self._timers = [t for t in self._timers if t.is_alive()] + [timer]
                timer.start()

    def _close(self, addresses: set[str]) -> None:
        with self._swap_lock:
            for addr in addresses:
                if addr in self.table.addresses():  # back in a newer table
                    continue
                self._stubs.pop(addr, None)
                watch = self._watches.pop(addr, None)
                if watch is not None:
                    watch.cancel()
                ch = self._channels.pop(addr, None)
                if ch is not None:
                    ch.close()

    def connected(self) -> list[str]:
        return sorted(self._channels)

    # ---- one layer -----------------------------------------------------------------------------------------

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        return self.wait(self.submit(layer, hidden, expert_ids, weights, defer_last=True))

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               first_part: bool = True, defer_last: bool = False) -> PendingLayer:
        """Send the layer's rows to the workers and return at once; `wait` gives the mixed output [T, D]. A
        forward enters layer 0 first: that starts a new step on the current table (first_part=False: another
        micro-batch of the same forward, same step). defer_last: leave the last worker's Dispatch to `wait`,
        which makes it a blocking call on the waiting thread (for a caller that waits right away)."""
        if layer == 0 and first_part:
            with self._swap_lock:
                self.step += 1
                self._local.table = self.table
        table = getattr(self._local, "table", None) or self.table
        plan = sort_by_expert(expert_ids, self.num_experts)
        x_sorted = hidden[plan.token].cpu()  # the one gather; each worker's rows are views of it
        pieces, start = [], 0
        for e, c in enumerate(plan.counts):
            if c:
                pieces.append(_Piece(e, start, c))
            start += c
        pending = PendingLayer(layer, table, plan, x_sorted, weights, hidden.device)
        pending.calls = self._issue(layer, table, pieces, x_sorted)
        for call in pending.calls[:-1] if defer_last else pending.calls:
            if call.stub is not None:
                self._hold_open(call.addr)
                call.send(self.timeout_s, self.call_metadata, block=False)
        return pending

    def cancel(self, pending: PendingLayer) -> None:
        """Drop a submitted layer that will not be waited for (the forward failed in its other micro-batch)."""
        for call in pending.calls:
            call.cancel()

    def wait(self, pending: PendingLayer) -> torch.Tensor:
        """The layer's expert mix [T, D]; rows of workers found down are re-sent to live replicas first."""
        layer, x_sorted = pending.layer, pending.x_sorted
        calls, parts = pending.calls, []
        try:
            while calls:  # a second round only re-sends the rows of workers found down in the first
                for call in calls:
                    if call.stub is not None and call.t0 == 0.0:  # not sent yet: the deferred last call
                        call.send(self.timeout_s, self.call_metadata, block=True)
                resend = []
                for call, out in zip(calls, self._collect(layer, calls), strict=True):
                    if isinstance(out, _PeerDown):
                        if self.plane.mark_down(out.addr, out.reason):
                            log.warning("expert worker %s (%s) marked down: %s", pending.table.name_of(out.addr),
                                        out.addr, out.reason)
                        resend += call.pieces
                    else:
                        parts.append((call.pieces, out))
                calls = self._issue(layer, pending.table, resend, x_sorted) if resend else []
                for call in calls[:-1]:
                    if call.stub is not None:
                        call.send(self.timeout_s, self.call_metadata, block=False)
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        if len(parts) == 1 and _covers(parts[0][0], x_sorted.shape[0]):
            y_sorted = parts[0][1]  # one worker answered every row, in order: its reply is the sorted output
        else:
            y_sorted = torch.empty_like(x_sorted)
            for pieces, out in parts:
                offset = 0
                for p in pieces:
                    y_sorted[p.start:p.start + p.n] = out[offset:offset + p.n]
                    offset += p.n
        return combine(y_sorted.to(pending.device), pending.plan.inverse, pending.weights)

    def _issue(self, layer: int, table: RoutingTable, pending: list[_Piece], x_sorted: torch.Tensor) -> list[_Call]:
        """One Dispatch per worker, not sent yet (unless a re-sent expert's rows land on a worker twice in one round:
        then that worker gets a second request); ExpertUnavailableError before sending anything when an expert
        has no live replica."""
        by_addr: dict[str, list[list[_Piece]]] = {}
        for p in pending:
            reps = table.replicas.get((layer, p.expert), ())
            live = [a for a in reps if not self.plane.is_down(a)]
            if not live:
                why = "; ".join(f"{table.name_of(a)} ({a}): {self.plane.down.get(a, '?')}" for a in reps)
                raise ExpertUnavailableError(f"layer {layer} expert {p.expert}: no live replica "
                                             f"({why or 'no worker hosts it'})")
            if len(live) == 1:
                split = [(live[0], p.start, p.n)]
            else:
                split = split_rows(p.start, p.n, live, rotate=self.step + p.expert)
            for addr, lo, n in split:
                reqs = by_addr.setdefault(addr, [[]])
                if any(q.expert == p.expert for q in reqs[-1]):
                    reqs.append([])
                reqs[-1].append(_Piece(p.expert, lo, n))
        calls = []
        for addr, groups in by_addr.items():
            for pieces in groups:
                calls.append(self._request(layer, addr, pieces, x_sorted))
        return calls

    def _request(self, layer: int, addr: str, pieces: list[_Piece], x_sorted: torch.Tensor) -> _Call:
        if _adjacent(pieces):  # one slice of the sorted rows: a view, no copy before encoding
            x = x_sorted[pieces[0].start:pieces[-1].start + pieces[-1].n]
        else:
            x = torch.cat([x_sorted[p.start:p.start + p.n] for p in pieces])
        req = expert_pb2.DispatchRequest(layer=layer, expert_ids=[p.expert for p in pieces],
                                         counts=[p.n for p in pieces], hidden=encode_tensor(x), step=self.step)
        return _Call(addr, pieces, req, x.shape[0], self._stubs.get(addr))  # stub None: not connected

    def _collect(self, layer: int, calls: list[_Call]) -> list[torch.Tensor | _PeerDown]:
        """Wait for every call of a round; the outputs (or _PeerDown) in call order, stats and listeners
        updated. A worker's refusal (INVALID_ARGUMENT, INTERNAL, ...) raises ExpertCallError."""
        t0 = min((c.t0 for c in calls if c.stub is not None), default=time.perf_counter())
        outs, compute, error = [], 0.0, None
        for c in calls:
            experts = [p.expert for p in c.pieces]
            if c.stub is None:
                outs.append(_PeerDown(c.addr, "not connected"))
                continue
            try:
                reply = c.result()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                if code in PEER_FAILURE_CODES:
                    self.stats.failed_rpcs += 1
                    outs.append(_PeerDown(c.addr, f"Dispatch of layer {layer} experts {experts}: {code.name}: "
                                                  f"{details}"))
                else:
                    error = error or ExpertCallError(f"layer {layer} experts {experts} on worker {c.addr}: "
                                                     f"{code.name}: {details}")
                    outs.append(None)
                continue
            except grpc.FutureCancelledError:
                outs.append(_PeerDown(c.addr, f"Dispatch of layer {layer} experts {experts}: cancelled"))
                continue
            if c.t1 < c.t0:  # answered, but the future's callback has not run yet
                c.t1 = time.perf_counter()
            out = decode_tensor(reply.output, expected_dtype=c.req.hidden.dtype, expected_shape_tail=None)
            if tuple(out.shape) != tuple(c.req.hidden.shape):
                error = error or ExpertCallError(f"worker {c.addr} answered shape {list(out.shape)} for "
                                                 f"{list(c.req.hidden.shape)}")
            outs.append(out)
            compute = max(compute, reply.compute_seconds)
            self._account(layer, c, reply, experts)
        self.stats.wall_seconds += max((c.t1 for c in calls if c.stub is not None), default=t0) - t0
        self.stats.expert_seconds += compute
        if error is not None:
            raise error
        return outs

    def _account(self, layer: int, c: _Call, reply, experts: list[int]) -> None:
        s, addr, seconds = self.stats, c.addr, c.t1 - c.t0
        sent, received = c.req.ByteSize(), reply.ByteSize()  # whole messages, not just tensor bytes
        s.rpcs += 1
        s.tokens += c.rows
        s.bytes_sent += sent
        s.bytes_received += received
        s.per_worker_tokens[addr] = s.per_worker_tokens.get(addr, 0) + c.rows
        s.per_worker_rpcs[addr] = s.per_worker_rpcs.get(addr, 0) + 1
        s.per_worker_seconds[addr] = s.per_worker_seconds.get(addr, 0.0) + seconds
        counts = [p.n for p in c.pieces]
        for fn in self._listeners:
            fn(layer, addr, experts, counts, seconds, sent, received)

    # ---- probes --------------------------------------------------------------------------------------------

    def _info_all(self, addresses: list[str], timeout_s: float) -> dict[str, expert_pb2.InfoResponse | None]:
        """Info of each address, asked concurrently; None where not connected, down or not answering in time."""
        futures = {}
        for addr in addresses:
            stub = self._stubs.get(addr)  # None: not connected (or closed by a table swap)
            if stub is not None:
                futures[addr] = stub.Info.future(expert_pb2.InfoRequest(), timeout=timeout_s,
                                                 metadata=self.call_metadata)
        out: dict[str, expert_pb2.InfoResponse | None] = dict.fromkeys(addresses)
        for addr, fut in futures.items():
            try:
                out[addr] = fut.result()
            except (grpc.RpcError, grpc.FutureCancelledError):
                pass
        return out

    def unreachable(self, timeout_s: float = 1.0) -> list[str]:
        """Workers of the table that are marked down or do not answer Info within timeout_s (probed
        concurrently)."""
        addrs = self.table.addresses()
        answers = self._info_all([a for a in addrs if not self.plane.is_down(a)], timeout_s)
        return [a for a in addrs if answers.get(a) is None]

    def infos(self, addresses: list[str], timeout_s: float = 2.0) -> dict[str, expert_pb2.InfoResponse]:
        """Info of each connected address that answers within timeout_s (asked concurrently); others left out."""
        return {a: info for a, info in self._info_all(addresses, timeout_s).items() if info is not None}

    def close(self) -> None:
        with self._swap_lock:
            self._closed = True
            for timer in self._timers:
                timer.cancel()
            for watch in self._watches.values():
                watch.cancel()
            self._watches.clear()
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()
