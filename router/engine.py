"""The serving engine: each step schedules, runs one model forward over all scheduled tokens, postprocesses.

`Engine` is synchronous; add_request/abort/stats may be called from other threads while one thread steps.
`AsyncEngine` runs that step loop in a background thread and streams outputs to asyncio consumers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from model.layers import AttentionBatch
from model.mixtral import Mixtral
from model.sampling import sample_batch

from .metrics import RouterMetrics
from .requests import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineDeadError,
    GenerationRequest,
    RequestOutput,
    TokenOutput,
)
from .scheduler import FINISHED, Chunk, EngineConfig, Scheduler, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    num_kv_blocks: int
    num_free_blocks: int
    num_preemptions: int  # total since start
    prompt_tokens_total: int  # prompt tokens of requests that got their first token
    generation_tokens_total: int  # sampled tokens
    last_step_seconds: float
    last_step_tokens: int  # new tokens in the last step's batch


@dataclass(frozen=True)
class _Batch:
    """A scheduled step, ready for the model."""

    chunks: list[Chunk]
    input_ids: torch.Tensor  # [T]
    attn: AttentionBatch
    sample_rows: list[int]  # indices into chunks whose last row is sampled


class Engine:
    def __init__(self, model: Mixtral, config: EngineConfig, metrics: RouterMetrics | None = None):
        self.model = model
        self.config = config
        num_blocks = config.num_blocks(model.cfg, model.dtype)
        self.scheduler = Scheduler(config, num_blocks, config.model_len(model.cfg))
        self.kv = model.new_kv_cache(num_blocks, config.block_size)
        self._lock = threading.Lock()  # guards everything below and the scheduler; not held during forward
        self._seqs: dict[str, Sequence] = {}  # unfinished requests
        self._outbox: list[RequestOutput] = []  # outputs made between steps (aborts), returned by step()
        self._in_flight: set[str] = set()  # request ids in the running forward
        self._pending_aborts: dict[str, str | None] = {}  # in-flight request id -> error, applied after it
        self._next_order = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step = (0.0, 0)
        self.metrics = metrics  # None: record nothing
        if metrics is not None:
            metrics.attach(self)

    # ---- requests in and out -------------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; ValueError when it is invalid or can never fit, QueueFullError at the bound."""
        request.sampling.validate()
        vocab = self.model.cfg.vocab_size
        if not request.prompt_ids:
            raise ValueError("prompt: needs at least one token")
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if request.logprobs is not None and not 0 <= request.logprobs <= vocab:
            raise ValueError(f"logprobs: must be in [0, {vocab}], got {request.logprobs}")
        stops = set(request.sampling.stop_token_ids)
        if not request.sampling.ignore_eos:
            stops.add(self.model.cfg.eos_token_id)
        with self._lock:
            if request.request_id in self._seqs:
                raise ValueError(f"request_id: {request.request_id!r} is already running")
            self.scheduler.check_fits(len(request.prompt_ids), request.sampling.max_tokens)
            seq = Sequence(request=request, order=self._next_order, token_ids=list(request.prompt_ids),
                           stop_ids=frozenset(stops), generator=request.sampling.make_generator())
            seq.metrics["arrival"] = request.arrival_time or time.monotonic()
            self.scheduler.add(seq)
            self._next_order += 1
            self._seqs[request.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Finish a request with "abort" and free its blocks: now, or after the forward it is part of.

        Its final output comes from the next step(). False when the request is unknown or already finished.
        """
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                return False
            if request_id in self._in_flight:
                self._pending_aborts.setdefault(request_id, None)
            else:
                self._finish(seq, FINISH_ABORT)
            return True

    def abort_all(self, error: str) -> list[RequestOutput]:
        """Fail every unfinished request (finish_reason "abort", `error` set); returns all pending outputs."""
        with self._lock:
            for rid, seq in list(self._seqs.items()):
                if rid in self._in_flight:
                    self._pending_aborts[rid] = error
                else:
                    self._finish(seq, FINISH_ABORT, error)
            return self._take_outbox()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs or self._outbox)

    def stats(self) -> EngineStats:
        with self._lock:
            alloc = self.scheduler.allocator
            return EngineStats(
                num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                kv_usage=alloc.usage_ratio, num_kv_blocks=alloc.num_blocks, num_free_blocks=alloc.num_free,
                num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=self._prompt_tokens,
                generation_tokens_total=self._generation_tokens, last_step_seconds=self._last_step[0],
                last_step_tokens=self._last_step[1])

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over all scheduled tokens, sample, and return this step's outputs."""
        start = time.monotonic()
        with self._lock:
            chunks = self.scheduler.schedule()
            if not chunks:
                return self._take_outbox()
            self._in_flight = {c.seq.request_id for c in chunks}
            batch = self._prepare(chunks)
        try:
            sampled = self._run(batch)
        except BaseException:
            with self._lock:
                self._end_forward()
            raise
        with self._lock:
            outputs = self._postprocess(chunks, sampled)
            self._end_forward()
            self._last_step = (time.monotonic() - start, int(batch.input_ids.numel()))
            if self.metrics is not None:
                self.metrics.step(*self._last_step)
            return outputs + self._take_outbox()

    def _prepare(self, chunks: list[Chunk]) -> _Batch:
        ids: list[int] = []
        seqs = []
        for c in chunks:
            s = c.seq
            end = s.num_computed + c.num_tokens
            ids.extend(s.token_ids[s.num_computed:end])
            seqs.append((list(self.scheduler.blocks.table(s.request_id)), end, c.num_tokens))
        device = self.model.device
        attn = AttentionBatch.build(seqs, self.config.block_size, self.model.cfg.sliding_window, device)
        return _Batch(chunks=chunks, input_ids=torch.tensor(ids, dtype=torch.long, device=device), attn=attn,
                      sample_rows=[i for i, c in enumerate(chunks) if c.samples])

    def _run(self, batch: _Batch) -> list[TokenOutput]:
        """The forward and sampling; touches no shared state, so it runs without the lock."""
        hidden = self.model.forward(batch.input_ids, batch.attn, self.kv)
        if not batch.sample_rows:
            return []
        seqs = [batch.chunks[i].seq for i in batch.sample_rows]
        logits = self.model.logits(hidden[batch.attn.last_token[batch.sample_rows]])  # [S, V] fp32
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        out = []
        for row, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            n = seq.request.logprobs
            if n is None:
                out.append(TokenOutput(token_id=tok))
                continue
            lp = torch.log_softmax(logits[row], dim=-1)
            top = torch.topk(lp, n)
            alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out.append(TokenOutput(token_id=tok, logprob=float(lp[tok]), top_logprobs=alts))
        return out

    def _postprocess(self, chunks: list[Chunk], sampled: list[TokenOutput]) -> list[RequestOutput]:
        samplers = [c.seq for c in chunks if c.samples]
        for c in chunks:
            if c.seq.request_id not in self._pending_aborts:
                c.seq.num_computed += c.num_tokens
        outputs = []
        now = time.monotonic()
        m = self.metrics
        for seq, tok in zip(samplers, sampled, strict=True):
            if seq.request_id in self._pending_aborts:
                continue
            if seq.num_generated == 0:
                self._prompt_tokens += seq.num_prompt
                seq.metrics["first_token"] = now
                if m is not None:
                    m.first_token(seq.metrics, now)
            elif m is not None:
                m.next_token(seq.metrics, now)
            seq.token_ids.append(tok.token_id)
            seq.new_tokens.append(tok)
            self._generation_tokens += 1
            if tok.token_id in seq.stop_ids:
                self._finish(seq, FINISH_STOP, emit=False)
            elif seq.num_generated >= seq.sampling.max_tokens:
                self._finish(seq, FINISH_LENGTH, emit=False)
            outputs.append(self._output(seq))
        return outputs

    def _end_forward(self) -> None:
        self._in_flight = set()
        pending, self._pending_aborts = self._pending_aborts, {}
        for rid, error in pending.items():
            seq = self._seqs.get(rid)
            if seq is not None:
                self._finish(seq, FINISH_ABORT, error)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, emit: bool = True) -> None:
        """Free the sequence's blocks and forget it; with emit, queue its final output for step()."""
        self.scheduler.finish(seq, reason)
        if self.metrics is not None:
            self.metrics.request_finished(seq.metrics, reason)
        seq.error = error
        del self._seqs[seq.request_id]
        if emit:
            self._outbox.append(self._output(seq))

    def _output(self, seq: Sequence) -> RequestOutput:
        tokens, seq.new_tokens = tuple(seq.new_tokens), []
        return RequestOutput(request_id=seq.request_id, tokens=tokens, num_prompt_tokens=seq.num_prompt,
                             num_generated_tokens=seq.num_generated, finished=seq.status == FINISHED,
                             finish_reason=seq.finish_reason, error=seq.error, metrics=dict(seq.metrics))

    def _take_outbox(self) -> list[RequestOutput]:
        out, self._outbox = self._outbox, []
        return out


class AsyncEngine:
    """Runs Engine.step in one background thread and streams each request's outputs to asyncio consumers.

    The HTTP layer calls it in two stages, so that admission errors surface before any response is sent:

        stream = await engine.generate(request)  # raises QueueFullError (429), ValueError (400),
                                                  # EngineDeadError (503) right here
        async for out in stream:                  # RequestOutput per step; the last has finished=True
            ...
    Leaving the loop early, closing the stream or cancelling the task (client disconnect) aborts the request
    and frees its KV blocks. A failed step fails every unfinished request (finish_reason "abort", error set)
    and the loop carries on; after max_consecutive_failures failed steps in a row it marks itself dead.
    """

    def __init__(self, engine: Engine, max_consecutive_failures: int = 3):
        self.engine = engine
        self.max_consecutive_failures = max_consecutive_failures
        self.last_error: str | None = None
        self._cv = threading.Condition()  # guards the fields below; wakes the idle loop
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._accepting = True
        self._stopping = False
        self._drain = True
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="expertmesh-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None and self._accepting

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Admit the request now (errors raise here), then return the stream of its outputs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if not self._accepting:
                raise EngineDeadError("engine is shutting down")
            self.engine.add_request(request)
            self._streams[request.request_id] = (loop, queue)
            self._cv.notify()
        return self._stream(request.request_id, queue)

    async def _stream(self, request_id: str,
                      queue: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            with self._cv:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        with self._cv:
            self._cv.notify()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with drain finish in-flight requests first, else abort them; then join the thread.

        Blocks; from async code use `await asyncio.to_thread(engine.shutdown, drain)`.
        """
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._drain = drain
            self._cv.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        failures = 0
        reason = "engine shut down"
        while True:
            with self._cv:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stopping and not (self._drain and self.engine.has_unfinished()):
                    break
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as e:  # e.g. an expert worker died: fail these requests, keep serving
                failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("engine step failed (%d in a row)", failures)
                self._deliver(self.engine.abort_all(f"engine step failed: {self.last_error}"))
                if failures >= self.max_consecutive_failures:
                    reason = f"engine failed {failures} steps in a row; last: {self.last_error}"
                    with self._cv:
                        self._dead = reason
                    break
                continue
            self._deliver(outputs)
        with self._cv:
            self._accepting = False
        self._deliver(self.engine.abort_all(reason))  # requests admitted while it was stopping

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._cv:
                entry = self._streams.get(out.request_id)
                if entry is not None and out.finished:
                    del self._streams[out.request_id]
            if entry is None:
                continue  # its consumer left
            loop, queue = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:
                pass  # that event loop is closed
