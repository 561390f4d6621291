"""What flows between the HTTP layer and the engine: requests in, per-step token outputs out."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.sampling import SamplingParams

from .errors import EngineDeadError, InvalidRequest, QueueFullError  # noqa: F401 - re-exported

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's logprob and n top alternatives
    arrival_time: float = 0.0  # time.monotonic() when the HTTP layer received it
    prompt_param: str = "prompt"  # the field errors about the prompt name ("messages" for chat)
    max_tokens_param: str = "max_tokens"  # the field errors about max_tokens name


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
    error_status: int | None = None  # with error: the HTTP status it maps to (errors.STATUS_*)
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_scheduled, first_token, finished


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
    failed_steps_total: int = 0  # forwards that raised (each retried, then bisected to the request at fault)
    recovering: bool = False  # the last forward failed and is being retried
    overlapped_steps_total: int = 0  # forwards run as two overlapped micro-batches (EngineConfig.overlap)
    overlap_choices: dict[str, str] = field(default_factory=dict)  # overlap=auto: per step group, on/off/probing
