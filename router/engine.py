"""The serving engine: each step schedules, runs one model forward over all scheduled tokens, postprocesses.

`Engine` is synchronous; add_request/abort/stats may be called from other threads while one thread steps.
`AsyncEngine` runs that step loop in a background thread and streams outputs to asyncio consumers.

Isolation: no request can fail another. A row whose logits are not finite fails only its own request. A
forward that raises leaves every sequence as it was (nothing advanced, seeded generators restored; the KV
slots it wrote are rewritten by the retry), is retried after `step_retry_delays_s`, and if it still fails the
batch is bisected: the halves run as their own forwards until the request(s) whose forward fails alone are
found; only those fail (500), everyone else goes on with outputs identical to a run without the fault.

Expert failover: a forward that raises ExpertUnavailableError (an expert has no live worker) is no request's
fault and is never bisected. The step is held, state untouched as above, while a controller repairs the expert
plane (router/expert_plane.py), and retried with backoff (and at once when the routing table changes); queued
requests wait. A request fails only past its own deadline (`request_timeout_s`) or when no one can repair the
plane, with a 503 that says why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from model.experts import can_overlap
from model.layers import AttentionBatch, micro_batches
from model.mixtral import Mixtral
from model.sampling import SamplingParamError, sample_batch

from .errors import STATUS_INTERNAL, STATUS_UNAVAILABLE, EngineDeadError, InvalidRequest
from .expert_plane import ExpertPlane, ExpertUnavailableError
from .metrics import RouterMetrics
from .overlap_choice import OverlapChooser
from .requests import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    TokenOutput,
)
from .scheduler import FINISHED, Chunk, EngineConfig, Scheduler, Sequence

log = logging.getLogger(__name__)
RECOVERY_POLL_S = (0.02, 0.5)  # first and longest wait between retries of a step held for the expert plane
__all__ = ["AsyncEngine", "Engine", "EngineStats"]


@dataclass(frozen=True)
class _Batch:
    """A scheduled step, ready for the model."""

    chunks: list[Chunk]
    input_ids: torch.Tensor  # [T]
    parts: list[AttentionBatch]  # one, or two overlapped micro-batches (EngineConfig.overlap)
    last_token: torch.Tensor  # [len(chunks)] row in T of each chunk's last token
    sample_rows: list[int]  # indices into chunks whose last row is sampled
    has_prefill: bool  # a chunk has more than one new token


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
        self._failed_steps = 0
        self._overlapped_steps = 0
        self._overlap = OverlapChooser(config.overlap if can_overlap(model.experts) else "off")
        self._recovering = False
        self.last_step_scheduled = False  # the last step() ran a forward (else it only returned outputs)
        self.metrics = metrics  # None: record nothing
        if metrics is not None:
            metrics.attach(self)

    # ---- requests in and out -------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """Prompt plus completion tokens one request can hold (the context and the KV cache bound it)."""
        return self.scheduler.max_request_tokens

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request. InvalidRequest (naming the field) when it is invalid or can never fit,
        QueueFullError at the waiting bound."""
        prompt_param, mt_param = request.prompt_param, request.max_tokens_param
        try:
            request.sampling.validate()
        except SamplingParamError as e:
            raise InvalidRequest(mt_param if e.param == "max_tokens" else e.param, e.message) from None
        vocab = self.model.cfg.vocab_size
        if not request.prompt_ids:
            raise InvalidRequest(prompt_param, "the prompt is empty")
        bad = next((t for t in request.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(prompt_param, f"token id {bad} is out of vocabulary (0..{vocab - 1})")
        for name, ids in (("stop_token_ids", request.sampling.stop_token_ids),
                          ("logit_bias", [t for t, _ in request.sampling.logit_bias])):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(name, f"token id {bad} is out of vocabulary (0..{vocab - 1})")
        if request.logprobs is not None and not 0 <= request.logprobs <= vocab:
            raise InvalidRequest("logprobs", f"must be in [0, {vocab}], got {request.logprobs}")
        stops = set(request.sampling.stop_token_ids)
        if not request.sampling.ignore_eos:
            stops.add(self.model.cfg.eos_token_id)
        with self._lock:
            if request.request_id in self._seqs:
                raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
            self.scheduler.check_fits(len(request.prompt_ids), request.sampling.max_tokens, prompt_param,
                                      mt_param)
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

    def abort_all(self, error: str, status: int = STATUS_UNAVAILABLE) -> list[RequestOutput]:
        """Fail every unfinished request (finish_reason "abort", `error` set); returns all pending outputs."""
        with self._lock:
            for rid, seq in list(self._seqs.items()):
                if rid in self._in_flight:
                    self._pending_aborts[rid] = error
                else:
                    self._finish(seq, FINISH_ABORT, error, status=status)
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
                last_step_tokens=self._last_step[1], failed_steps_total=self._failed_steps,
                recovering=self._recovering, overlapped_steps_total=self._overlapped_steps,
                overlap_choices=self._overlap.choices())

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over all scheduled tokens, sample, and return this step's outputs.

        A forward that fails is retried, then bisected (see the module doc); step() itself only raises on a
        bug outside the forward."""
        start = time.monotonic()
        with self._lock:
            self._expire_waiting(start)
            self._expire_deadlines(start)
            chunks = self.scheduler.schedule()
            self.last_step_scheduled = bool(chunks)
            if not chunks:
                return self._take_outbox()
            self._in_flight = {c.seq.request_id for c in chunks}
        try:
            outputs = self._run_isolated(chunks)
        finally:
            with self._lock:
                self._end_forward()
        with self._lock:
            self._last_step = (time.monotonic() - start, sum(c.num_tokens for c in chunks))
            if self.metrics is not None:
                self.metrics.step(*self._last_step)
            return outputs + self._take_outbox()

    def _expire_waiting(self, now: float) -> None:
        """Fail (503) waiting requests never scheduled within the queue timeout."""
        timeout = self.config.queue_timeout_s
        if timeout is None:
            return
        for seq in [s for s in self.scheduler.waiting if "first_scheduled" not in s.metrics]:
            if now - seq.metrics["arrival"] > timeout:
                self._finish(seq, FINISH_ABORT, f"the request waited {now - seq.metrics['arrival']:.1f} s in "
                             f"the queue, longer than the queue timeout ({timeout:g} s); retry later",
                             status=STATUS_UNAVAILABLE)

    def _expire_deadlines(self, now: float) -> None:
        """Fail (503) requests, not in the running forward, older than the request timeout."""
        if self.config.request_timeout_s is None:
            return
        for seq in [s for rid, s in self._seqs.items() if rid not in self._in_flight]:
            if now - seq.metrics["arrival"] > self.config.request_timeout_s:
                self._finish(seq, FINISH_ABORT, self._deadline_error(now, seq), status=STATUS_UNAVAILABLE)

    def _deadline_error(self, now: float, seq: Sequence, why: str = "") -> str:
        return (f"the request ran {now - seq.metrics['arrival']:.1f} s, past its deadline (request timeout "
                f"{self.config.request_timeout_s:g} s){why}")

    def _run_isolated(self, chunks: list[Chunk]) -> list[RequestOutput]:
        """Run chunks as one forward; on failure retry, then bisect so only the request at fault fails; an
        unavailable expert holds the step until the expert plane recovers instead."""
        try:
            return self._forward(chunks)
        except ExpertUnavailableError as e:
            return self._await_experts(chunks, e)
        except Exception as e:  # noqa: BLE001 - any failure of the forward is handled the same way
            error = e
        self._recovering = True
        try:
            for delay in self.config.step_retry_delays_s:
                self._failed_steps += 1
                log.warning("forward of %d sequences failed (%s: %s); retrying in %.2f s", len(chunks),
                            type(error).__name__, error, delay)
                time.sleep(delay)
                try:
                    return self._forward(chunks)
                except ExpertUnavailableError as e:
                    return self._await_experts(chunks, e)
                except Exception as e:  # noqa: BLE001
                    error = e
            self._failed_steps += 1
            return self._bisect(chunks, error)
        finally:
            self._recovering = False

    def _expert_plane(self) -> ExpertPlane | None:
        plane = getattr(self.model.experts, "plane", None)  # RemoteExperts has one; in-process experts none
        return plane if isinstance(plane, ExpertPlane) else None

    def _await_experts(self, chunks: list[Chunk], error: ExpertUnavailableError) -> list[RequestOutput]:
        """Hold the step until a forward over it succeeds again: retry with backoff, and at once after a
        routing-table swap. Drops requests that pass their deadline or are aborted meanwhile; fails the rest
        (503) when the plane cannot be repaired."""
        plane = self._expert_plane()
        started = time.monotonic()
        self._recovering = True
        log.warning("expert plane failed under a step of %d sequences (%s); holding it until the plane recovers",
                    len(chunks), error)
        generation = plane.generation if plane is not None else 0
        delay, retries = RECOVERY_POLL_S[0], 0
        unsupervised_tries = list(self.config.step_retry_delays_s)
        try:
            while True:
                self._failed_steps += 1
                why_not = plane.why_not_recoverable() if plane is not None else "the experts are not remote"
                if why_not is not None and not unsupervised_tries:
                    log.error("expert plane cannot recover (%s): failing %d requests", why_not, len(chunks))
                    return self._fail_chunks(chunks, f"expert plane unavailable: {error}; {why_not}")
                chunks = self._drop_expired(chunks, error)
                if not chunks:
                    return []
                if why_not is not None:
                    time.sleep(unsupervised_tries.pop(0))
                elif plane is not None:
                    generation = plane.wait_for_change(generation, delay)
                    delay = min(2 * delay, RECOVERY_POLL_S[1])
                retries += 1
                if self.metrics is not None:
                    self.metrics.step_retry()
                try:
                    outputs = self._forward(chunks)
                except ExpertUnavailableError as e:
                    error = e
                    continue
                except Exception as e:  # noqa: BLE001 - a request-caused failure after all: isolate it
                    return self._bisect(chunks, e)
                seconds = time.monotonic() - started
                log.warning("expert plane recovered after %.2f s (%d step retries)", seconds, retries)
                if self.metrics is not None:
                    self.metrics.recovered(seconds)
                return outputs
        finally:
            self._recovering = False

    def _drop_expired(self, chunks: list[Chunk], error: Exception) -> list[Chunk]:
        """chunks without those aborted meanwhile (they finish after the step) or past their deadline (failed
        now: their blocks are freed, their chunk leaves the held step)."""
        now, keep = time.monotonic(), []
        timeout = self.config.request_timeout_s
        with self._lock:
            for c in chunks:
                seq = c.seq
                if seq.request_id in self._pending_aborts or seq.status == FINISHED:
                    continue
                if timeout is not None and now - seq.metrics["arrival"] > timeout:
                    log.error("request %s passed its deadline while the expert plane recovered", seq.request_id)
                    self._finish(seq, FINISH_ABORT, self._deadline_error(
                        now, seq, f" while waiting for the expert plane to recover: {error}"),
                        status=STATUS_UNAVAILABLE)
                    self._in_flight.discard(seq.request_id)
                    continue
                keep.append(c)
        return keep

    def _fail_chunks(self, chunks: list[Chunk], error: str) -> list[RequestOutput]:
        with self._lock:
            for c in chunks:
                seq = c.seq
                if seq.request_id not in self._pending_aborts and seq.status != FINISHED:
                    self._finish(seq, FINISH_ABORT, error, status=STATUS_UNAVAILABLE)
        return []

    def _bisect(self, chunks: list[Chunk], error: Exception) -> list[RequestOutput]:
        if len(chunks) == 1:
            seq = chunks[0].seq
            log.error("request %s fails alone: %s: %s", seq.request_id, type(error).__name__, error)
            with self._lock:
                if seq.request_id not in self._pending_aborts and seq.status != FINISHED:
                    self._finish(seq, FINISH_ABORT, f"engine step failed: {type(error).__name__}: {error}",
                                 status=STATUS_INTERNAL)
            return []
        mid = len(chunks) // 2
        outputs: list[RequestOutput] = []
        for half in (chunks[:mid], chunks[mid:]):
            try:
                outputs += self._forward(half)
            except ExpertUnavailableError as e:
                outputs += self._await_experts(half, e)
            except Exception as e:  # noqa: BLE001
                outputs += self._bisect(half, e)
        return outputs

    def _forward(self, chunks: list[Chunk]) -> list[RequestOutput]:
        """One forward + sampling over chunks, then postprocess; on failure nothing has changed."""
        with self._lock:
            batch = self._prepare(chunks)
        seeded = [(s.generator, s.generator.get_state()) for s in (c.seq for c in chunks if c.samples)
                  if s.generator is not None]
        t0 = time.monotonic()
        try:
            sampled = self._run(batch)
        except BaseException:
            for g, state in seeded:  # the retry draws the same numbers
                g.set_state(state)
            raise
        with self._lock:
            self._overlap.record(len(chunks), batch.has_prefill, len(batch.parts) > 1, time.monotonic() - t0,
                                 int(batch.input_ids.shape[0]))
            return self._postprocess(chunks, sampled)

    def _prepare(self, chunks: list[Chunk]) -> _Batch:
        ids: list[int] = []
        seqs = []
        for c in chunks:
            s = c.seq
            end = s.num_computed + c.num_tokens
            ids.extend(s.token_ids[s.num_computed:end])
            seqs.append((list(self.scheduler.blocks.table(s.request_id)), end, c.num_tokens))
        device, window = self.model.device, self.model.cfg.sliding_window
        has_prefill = any(c.num_tokens > 1 for c in chunks)
        if self._overlap.split(len(seqs), has_prefill):
            parts, last_token = micro_batches(seqs, self.config.block_size, window, device)
        else:
            attn = AttentionBatch.build(seqs, self.config.block_size, window, device)
            parts, last_token = [attn], attn.last_token
        return _Batch(chunks=chunks, input_ids=torch.tensor(ids, dtype=torch.long, device=device), parts=parts,
                      last_token=last_token, sample_rows=[i for i, c in enumerate(chunks) if c.samples],
                      has_prefill=has_prefill)

    def _run(self, batch: _Batch) -> list[TokenOutput | str]:
        """The forward and sampling; touches no shared state, so it runs without the lock."""
        if len(batch.parts) > 1:
            hidden = self.model.forward_ping_pong(batch.input_ids, batch.parts, self.kv)
            with self._lock:
                self._overlapped_steps += 1
        else:
            hidden = self.model.forward(batch.input_ids, batch.parts[0], self.kv)
        if not batch.sample_rows:
            return []
        seqs = [batch.chunks[i].seq for i in batch.sample_rows]
        logits = self.model.logits(hidden[batch.last_token[batch.sample_rows]])  # [S, V] fp32
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        out = []
        for row, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            n = seq.request.logprobs
            if isinstance(tok, str) or n is None:  # str: this row's logits were not finite, its request fails
                out.append(tok if isinstance(tok, str) else TokenOutput(token_id=tok))
                continue
            lp = torch.log_softmax(logits[row], dim=-1)
            top = torch.topk(lp, n)
            alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out.append(TokenOutput(token_id=tok, logprob=float(lp[tok]), top_logprobs=alts))
        return out

    def _postprocess(self, chunks: list[Chunk], sampled: list[TokenOutput | str]) -> list[RequestOutput]:
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
            if isinstance(tok, str):
                self._finish(seq, FINISH_ABORT, tok, status=STATUS_INTERNAL)
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
                self._finish(seq, FINISH_ABORT, error, status=STATUS_UNAVAILABLE)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, emit: bool = True,
                status: int | None = None) -> None:
        """Free the sequence's blocks and forget it; with emit, queue its final output for step()."""
        self.scheduler.finish(seq, reason)
        if self.metrics is not None:
            self.metrics.request_finished(seq.metrics, reason)
        seq.error = error
        seq.error_status = (status or STATUS_UNAVAILABLE) if error else None
        del self._seqs[seq.request_id]
        if emit:
            self._outbox.append(self._output(seq))

    def _output(self, seq: Sequence) -> RequestOutput:
        tokens, seq.new_tokens = tuple(seq.new_tokens), []
        return RequestOutput(request_id=seq.request_id, tokens=tokens, num_prompt_tokens=seq.num_prompt,
                             num_generated_tokens=seq.num_generated, finished=seq.status == FINISHED,
                             finish_reason=seq.finish_reason, error=seq.error, error_status=seq.error_status,
                             metrics=dict(seq.metrics))

    def _take_outbox(self) -> list[RequestOutput]:
        out, self._outbox = self._outbox, []
        return out


class AsyncEngine:
    """Runs Engine.step in one background thread and streams each request's outputs to asyncio consumers;
    implements router.engine_client.EngineClient.

    The HTTP layer calls it in two stages, so that admission errors surface before any response is sent:

        stream = await engine.generate(request)  # raises InvalidRequest (400), QueueFullError (429),
                                                  # EngineDeadError (503) right here
        async for out in stream:                  # RequestOutput per step; the last has finished=True
            ...
    Leaving the loop early, closing the stream or cancelling the task (client disconnect) aborts the request
    and frees its KV blocks. No failure is fatal: a failed forward fails only the request(s) at fault (see
    Engine), and an unexpected error outside the forward fails the requests then in the engine and the loop
    goes on. Only shutdown() stops it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.last_error: str | None = None
        self._cv = threading.Condition()  # guards the fields below; wakes the idle loop
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._accepting = True
        self._stopping = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name="expertmesh-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_request_tokens(self) -> int:
        return self.engine.max_request_tokens

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Admit the request now (errors raise here), then return the stream of its outputs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._cv:
            if not self._accepting or not self._thread.is_alive():
                raise EngineDeadError("the engine is shutting down")
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
        while True:
            with self._cv:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stopping and not (self._drain and self.engine.has_unfinished()):
                    break
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug outside the forward: fail what is in the engine, keep serving
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("engine step failed outside the forward")
                outputs = self.engine.abort_all(f"engine step failed: {self.last_error}", STATUS_INTERNAL)
                time.sleep(0.01)
            self._deliver(outputs)
            if not outputs and not self.engine.last_step_scheduled:
                time.sleep(0.001)  # nothing could be scheduled this round (e.g. waiting for KV blocks)
        with self._cv:
            self._accepting = False
        self._deliver(self.engine.abort_all("the engine shut down"))  # requests admitted while it stopped

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
