"""What flows between the HTTP layer and the engine: requests in, per-step token outputs out."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.sampling import SamplingParams

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the HTTP layer answers 429 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an expert is unreachable and could not be recovered, or it was shut down)."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's logprob and n top alternatives
    arrival_time: float = 0.0  # time.monotonic() when the HTTP layer received it


@dataclass(frozen=True)
class TokenOutput:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """New tokens for one request from one engine step; the last one has finished=True."""

    request_id: str
    tokens: tuple[TokenOutput, ...]
    num_prompt_tokens: int
    num_generated_tokens: int  # total so far, including these
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # set when the engine failed the request (finish_reason "abort")
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_scheduled, first_token, finished
