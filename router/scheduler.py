"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running sequences that decode (one uncomputed token) go first, in arrival
order; then partly prefilled running sequences and finally waiting ones fill what is left of the budget with
prefill chunks. A sequence whose next token finds no free KV block preempts the most recently arrived running
sequence: its blocks are freed, it goes back to the front of the waiting queue and later recomputes its
prompt plus generated tokens (recompute, not swap).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.config import MixtralConfig
from model.mixtral import KVCache
from model.sampling import SamplingParams

from .errors import InvalidRequest, QueueFullError
from .kv_blocks import BlockAllocator, BlockTables
from .requests import GenerationRequest, TokenOutput

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # KV cache size in blocks; or give kv_cache_bytes
    kv_cache_bytes: int | None = None  # KV cache budget in bytes, used when num_kv_blocks is None
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 512  # new tokens per step at most; prefills are chunked to fit
    max_waiting: int = 256  # add_request raises QueueFullError beyond this many waiting requests
    max_model_len: int | None = None  # prompt + max_tokens limit; None: the model's max_position_embeddings
    queue_timeout_s: float | None = None  # a request not scheduled within this many seconds fails with 503
    request_timeout_s: float | None = None  # a request not finished this many seconds after arrival fails (503)
    step_retry_delays_s: tuple[float, ...] = (0.05,)  # a failed forward is retried after each delay, then
    #                                                   bisected to the request(s) at fault
    overlap: str = "off"  # on | off | auto: steps of 2+ sequences as two micro-batches, one's attention
    #                      overlapping the other's remote experts; auto measures (router/overlap_choice.py)

    def num_blocks(self, cfg: MixtralConfig, dtype: torch.dtype) -> int:
        if self.num_kv_blocks is not None:
            n = self.num_kv_blocks
        elif self.kv_cache_bytes is not None:
            n = self.kv_cache_bytes // KVCache.bytes_per_block(cfg, self.block_size, dtype)
        else:
            raise ValueError("num_kv_blocks: set it or kv_cache_bytes")
        if n < 1:
            raise ValueError(f"num_kv_blocks: the KV cache must hold at least one block, got {n}")
        return n

    def model_len(self, cfg: MixtralConfig) -> int:
        limit = self.max_model_len or cfg.max_position_embeddings
        if limit > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len: {limit} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        return limit

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.queue_timeout_s is not None and not self.queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s: must be positive, got {self.queue_timeout_s}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be positive, got {self.request_timeout_s}")
        if self.overlap not in ("off", "on", "auto"):
            raise ValueError(f"overlap: {self.overlap!r} is not one of off, on, auto")
        if any(not 0 <= d <= 60 for d in self.step_retry_delays_s):
            raise ValueError(f"step_retry_delays_s: each delay must be in [0, 60], got {self.step_retry_delays_s}")


@dataclass(eq=False)
class Sequence:
    """One request's state: prompt + generated token ids and how many of them have KV in the cache."""

    request: GenerationRequest
    order: int  # arrival order: the preemption victim is the running sequence with the largest
    token_ids: list[int]
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    num_computed: int = 0
    status: str = WAITING
    finish_reason: str | None = None
    error: str | None = None
    error_status: int | None = None
    new_tokens: list[TokenOutput] = field(default_factory=list)  # sampled, not yet returned
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class Chunk:
    """num_tokens tokens of seq, starting at seq.num_computed, run in this step."""

    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk completes the sequence's uncomputed tokens, so its last row is sampled."""
        return self.num_tokens == self.seq.num_uncomputed


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int):
        config.validate()
        self.config = config
        self.max_model_len = max_model_len
        self.blocks = BlockTables(BlockAllocator(num_blocks), config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def allocator(self) -> BlockAllocator:
        return self.blocks.allocator

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + completion) one request can hold: the context and the KV cache bound it."""
        return min(self.max_model_len, self.allocator.num_blocks * self.config.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int, prompt_param: str = "prompt",
                   max_tokens_param: str = "max_tokens") -> None:
        """InvalidRequest (vLLM's wording) when a request could never run, even alone."""
        limit, what = self.max_model_len, prompt_param
        if prompt_len >= limit:
            raise InvalidRequest(prompt_param, f"This model's maximum context length is {limit} tokens. However, "
                                               f"your {what} has {prompt_len} tokens, leaving no room for a "
                                               f"completion. Please reduce the length of the {what}.")
        if prompt_len + max_tokens > limit:
            raise InvalidRequest(max_tokens_param, f"This model's maximum context length is {limit} tokens. "
                                                   f"However, you requested {prompt_len + max_tokens} tokens "
                                                   f"({prompt_len} in the {what}, {max_tokens} in the "
                                                   f"completion). Please reduce the length of the {what} or "
                                                   "completion.")
        cap = self.max_request_tokens
        if prompt_len + max_tokens > cap:
            raise InvalidRequest(max_tokens_param if prompt_len < cap else prompt_param,
                                 f"the KV cache holds at most {cap} tokens for one request, you requested "
                                 f"{prompt_len + max_tokens} ({prompt_len} in the {what}, {max_tokens} in the "
                                 "completion)")

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the queues and free its blocks."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq.request_id)
        seq.status, seq.finish_reason = FINISHED, reason
        seq.metrics["finished"] = time.monotonic()

    def schedule(self) -> list[Chunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        scheduled: set[int] = set()  # id() of sequences with a chunk this step
        preempted: set[int] = set()
        by_arrival = sorted(self.running, key=lambda s: s.order)
        # 1. decodes: one token each; preempt the latest arrival when no block is free for it
        for seq in by_arrival:
            if budget == 0:
                break
            if seq.num_uncomputed != 1 or id(seq) in preempted:
                continue
            while not self.blocks.grow(seq.request_id, seq.num_computed + 1):
                victim = self._latest_unscheduled(scheduled)
                self._preempt(victim)
                preempted.add(id(victim))
                if victim is seq:
                    break
            if id(seq) not in preempted:
                chunks.append(Chunk(seq, 1))
                scheduled.add(id(seq))
                budget -= 1
        # 2. running sequences part way through their prefill: as much as budget and free blocks allow
        for seq in by_arrival:
            if budget == 0:
                break
            if seq.num_uncomputed == 1 or id(seq) in preempted:
                continue
            n = self._fit_prefill(seq, budget, scheduled, preempted)
            if n:
                chunks.append(Chunk(seq, n))
                scheduled.add(id(seq))
                budget -= n
        # 3. waiting sequences, first come first served; a new sequence needs blocks for its whole chunk
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if id(seq) in preempted:
                break  # do not readmit what this step just evicted
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.grow(seq.request_id, n):
                break
            self.waiting.popleft()
            seq.status = RUNNING
            seq.metrics.setdefault("first_scheduled", time.monotonic())
            self.running.append(seq)
            chunks.append(Chunk(seq, n))
            budget -= n
        return chunks

    def _fit_prefill(self, seq: Sequence, budget: int, scheduled: set[int], preempted: set[int]) -> int:
        """Tokens of a running prefill that fit this step; may preempt later arrivals to make room."""
        while True:
            n = min(seq.num_uncomputed, budget, self.blocks.capacity(seq.request_id) - seq.num_computed)
            if n > 0:
                self.blocks.grow(seq.request_id, seq.num_computed + n)
                return n
            victim = self._latest_unscheduled(scheduled)
            if victim is seq:
                return 0  # wait for blocks; the earlier arrivals holding them will finish or be preempted
            self._preempt(victim)
            preempted.add(id(victim))

    def _latest_unscheduled(self, scheduled: set[int]) -> Sequence:
        return max((s for s in self.running if id(s) not in scheduled), key=lambda s: s.order)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.request_id)
        seq.num_computed = 0
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
