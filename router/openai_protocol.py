"""OpenAI-compatible request/response models, with vLLM's extensions top_k, ignore_eos, stop_token_ids.

The one parse of an HTTP body into a typed request: JSON (strict: no NaN/Infinity, no lone surrogates, integer
literals of any length), then pydantic types, OpenAI's protocol rules and the size bounds below. Numeric
ranges that the engine also needs (temperature, top_p, top_k, max_tokens, seed, logit_bias values) and every
limit of the model (vocabulary, context, KV cache) are checked once, by the engine (router.errors.InvalidRequest).

Bounds (each -> 400 naming the field): at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS
characters, MAX_STOP_TOKEN_IDS stop_token_ids, MAX_LOGIT_BIAS logit_bias entries, MAX_MESSAGES messages of at
most MAX_CONTENT_PARTS content parts each; logprobs and top_logprobs at most MAX_LOGPROBS. The body itself is
bounded by the server's --max-request-bytes (413).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from model.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # OpenAI's bound
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_INT_DIGITS = 40  # longer integer literals parse as +-10**40: out of every range, without quadratic int()
Number = StrictInt | StrictFloat


class ProtocolError(ValueError):
    """A request the server cannot honour; `param` names the offending field (-> 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Base):
    include_usage: StrictBool | None = False


class _SamplingRequest(_Base):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    n: StrictInt | None = 1
    best_of: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False
    user: StrictStr | None = None
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[str, Number] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingRequest:
        if self.n not in (None, 1):
            raise ProtocolError(f"n: only n=1 is supported, got {self.n}", "n")
        if self.best_of not in (None, 1):
            raise ProtocolError(f"best_of: only best_of=1 is supported, got {self.best_of}", "best_of")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ProtocolError(f"{name}: only 0 is supported, got {getattr(self, name)}", name)
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ProtocolError(f"logit_bias: keys must be token ids (decimal strings), got {key[:40]!r}",
                                    "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options: can only be set when stream=true", "stream_options")
        stops = self.stop_list
        if len(stops) > MAX_STOP_STRINGS:
            raise ProtocolError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise ProtocolError("stop: stop strings must be non-empty", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ProtocolError(f"stop: each stop string has at most {MAX_STOP_CHARS} characters", "stop")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters (it validates their ranges)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p), top_k=self.top_k or 0, seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=bool(self.ignore_eos),
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ProtocolError("echo: only echo=false is supported", "echo")
        if self.suffix:
            raise ProtocolError("suffix: not supported", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ProtocolError(f"logprobs: must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ProtocolError(f"prompt: batched prompts are not supported (got {len(p)}); send one "
                                    "prompt per request", "prompt")
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]
        return p


class ChatMessage(_Base):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _check_parts(self) -> ChatMessage:
        if isinstance(self.content, list) and len(self.content) > MAX_CONTENT_PARTS:
            raise ProtocolError(f"messages: at most {MAX_CONTENT_PARTS} content parts per message, got "
                                f"{len(self.content)}", "messages")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if not self.messages:
            raise ProtocolError("messages: must contain at least one message", "messages")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ProtocolError(f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                    "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise ProtocolError("top_logprobs: requires logprobs=true", "top_logprobs")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- responses ------------------------------------------------------------------------------------------

class UsageInfo(_Base):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(_Base):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Base):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Base):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Base):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(_Base):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Base):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Base):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Base):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(_Base):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Base):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Base):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(_Base):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(_Base):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "expertmesh"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Base):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _parse_int(text: str) -> int:
    if len(text) <= MAX_INT_DIGITS:
        return int(text)
    return -(10**MAX_INT_DIGITS) if text.startswith("-") else 10**MAX_INT_DIGITS


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"Invalid JSON body: {name} is not valid JSON (send numbers only)")


def _check_strings(obj: Any) -> None:
    """Lone UTF-16 surrogates (an escaped \\ud800) are valid JSON but not text: reject them up front."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError("Invalid JSON body: a string holds a lone surrogate (invalid Unicode)") from None
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def parse_request(raw: bytes, cls: type[_SamplingRequest]) -> _SamplingRequest:
    """Body bytes -> typed request; raises ProtocolError (naming the field where one is at fault) or pydantic's
    ValidationError."""
    try:
        obj = json.loads(raw, parse_int=_parse_int, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"Invalid JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("The request body must be a JSON object")
    _check_strings(obj)
    return cls.model_validate(obj)


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
