"""The OpenAI server's handlers: completions and chat (one shared generation flow), models, health, version.

A generation request goes: body (bounded) -> typed request (router.openai_protocol) -> prompt ids (tokenized
off the event loop) -> GenerationRequest -> the engine, which validates it against the model and answers
admission errors (400/429/503) before any response starts -> a JSON response, or SSE with one chunk per
generated token (empty text while bytes or a possible stop string are held back, as vLLM does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .engine_client import EngineClient
from .errors import STATUS_UNAVAILABLE
from .http_errors import ApiError, from_engine, from_protocol, from_validation
from .openai_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    TopLogprob,
    parse_request,
)
from .requests import GenerationRequest, RequestOutput, TokenOutput
from .text_state import TextState

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


@dataclass(frozen=True)
class ApiLimits:
    max_request_bytes: int = 4 * 1024 * 1024  # bigger bodies -> 413
    max_concurrent_requests: int = 1024  # more requests in flight (streams included) -> 503 + Retry-After

    def validate(self) -> None:
        for name in ("max_request_bytes", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")


@dataclass
class ApiContext:
    """What every handler shares."""

    engine: EngineClient
    tokenizer: Any
    served_model_name: str
    limits: ApiLimits = field(default_factory=ApiLimits)
    health_check: Callable[[], bool] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    tasks: set[asyncio.Future[Any]] = field(default_factory=set)  # fire-and-forget cleanups

    def background(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self.tasks.add(fut)
        fut.add_done_callback(self.tasks.discard)


class _Disconnected(Exception):
    """The client went away while its request was running."""


class _SSEResponse(StreamingResponse):
    """Closes its body generator when the response ends, so a disconnect runs the generator's cleanup now
    (Starlette cancels the send on http.disconnect; a generator paused at `yield` would otherwise only be
    finalized by the garbage collector)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _clamp(lp: float | None) -> float | None:
    return None if lp is None else (MIN_LOGPROB if math.isnan(lp) else max(float(lp), MIN_LOGPROB))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes (413 beyond: a chunked body declares no Content-Length)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"The request body exceeds the limit of {limit} bytes (--max-request-bytes)")
        parts.append(part)
    return b"".join(parts)


class GenerationHandler:
    """The flow shared by /v1/completions and /v1/chat/completions; subclasses fill in the formats."""

    request_cls: type = CompletionRequest
    prompt_param = "prompt"
    id_prefix = "cmpl"

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self._token_text: dict[int, str] = {}

    # ---- the flow --------------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        arrival = time.monotonic()
        body = await self.parse(request)
        prompt_ids = await anyio.to_thread.run_sync(self.tokenize, body)
        rid = self._request_id(request)
        n_lp = self.num_logprobs(body)
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:  # as many as the context and the KV cache leave room for
            max_tokens = max(1, self.ctx.engine.max_request_tokens - len(prompt_ids))
        gen = GenerationRequest(request_id=rid, prompt_ids=tuple(prompt_ids),
                                sampling=body.sampling_params(max_tokens), logprobs=n_lp, arrival_time=arrival,
                                prompt_param=self.prompt_param, max_tokens_param=body.max_tokens_param)
        st = TextState(self.ctx.tokenizer, prompt_ids, body.stop_list, list(body.stop_token_ids or ()),
                       n_lp is not None)
        it = await self.start(gen)
        reply = _Reply(f"{self.id_prefix}-{rid}", int(time.time()), self.ctx.served_model_name, body, n_lp)
        if body.stream:
            return self.stream(it, st, rid, reply)
        try:
            await self.run_to_end(request, it, st, rid)
        except _Disconnected:
            return Response(status_code=499)
        return JSONResponse(self.response(reply, st))

    async def parse(self, request: Request) -> Any:
        raw = await read_body(request, self.ctx.limits.max_request_bytes)
        try:
            body = parse_request(raw, self.request_cls)
        except ProtocolError as e:
            raise from_protocol(e) from None
        except ValidationError as e:
            raise from_validation(list(e.errors())) from None
        if body.model is not None and body.model != self.ctx.served_model_name:
            raise ApiError(404, f"The model `{body.model[:200]}` does not exist.", param="model")
        return body

    def tokenize(self, body: Any) -> list[int]:
        raise NotImplementedError

    def num_logprobs(self, body: Any) -> int | None:
        return body.logprobs

    async def start(self, gen: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Admission: the engine's errors (invalid, queue full, shut down) become statuses here."""
        engine = self.ctx.engine
        try:
            if not engine.is_alive:
                raise ApiError(503, "The engine is not accepting requests (shutting down)")
            stream = await engine.generate(gen)
            return stream.__aiter__()
        except Exception as e:
            raise from_engine(e) from None

    async def outputs(self, it: AsyncIterator[RequestOutput], st: TextState) -> AsyncIterator[int]:
        """Feed engine outputs into st until it is finished; yields the count of tokens each one added."""
        while not st.finished:
            try:
                out = await it.__anext__()
            except StopAsyncIteration:
                st.end_without_finish()
                yield 0
                return
            yield st.feed(out)

    async def run_to_end(self, request: Request, it: AsyncIterator[RequestOutput], st: TextState,
                         rid: str) -> None:
        async def consume() -> None:
            async for _ in self.outputs(it, st):
                pass

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            self._cleanup(it, st, rid)
        if not task.done() or task.cancelled():
            raise _Disconnected
        if task.exception() is not None:
            raise from_engine(task.exception())
        if st.error:
            raise self.failed(st)

    def failed(self, st: TextState) -> ApiError:
        if st.error_status == STATUS_UNAVAILABLE:
            return ApiError(503, f"The request could not be served: {st.error}",
                            headers={"Retry-After": "1"})
        return ApiError(500, f"Generation failed: {st.error}")

    def stream(self, it: AsyncIterator[RequestOutput], st: TextState, rid: str, reply: _Reply) -> Response:
        async def body() -> AsyncIterator[str]:
            try:
                head = self.stream_head(reply)
                if head is not None:
                    yield _sse(head)
                async for n_tokens in self.outputs(it, st):
                    if st.error:
                        err = self.failed(st)
                        yield _sse(err.body())
                        break
                    if n_tokens or st.finished:  # one chunk per token step, even with no text yet
                        yield _sse(self.chunk(reply, st.take(), st.take_logprobs(), st))
                else:
                    if reply.body.include_usage:
                        yield _sse({**self.usage_base(reply), "usage": st.usage().model_dump()})
            except Exception as e:  # after the headers went out, errors travel in-band
                yield _sse(from_engine(e).body())
            finally:
                self._cleanup(it, st, rid)
            yield "data: [DONE]\n\n"

        return _SSEResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _cleanup(self, it: AsyncIterator[RequestOutput], st: TextState, rid: str) -> None:
        """Abort in the engine unless it finished the request, and close its stream (without awaiting inside a
        cancelled scope)."""
        if not st.engine_done:
            try:
                self.ctx.engine.abort(rid)
            except Exception:  # best-effort cleanup
                log.exception("abort(%s) failed", rid)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            self.ctx.background(_quietly(aclose()))

    def _request_id(self, request: Request) -> str:
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
        return f"{rid}-{uuid.uuid4().hex[:8]}"

    def token_text(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.ctx.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    # ---- formats (subclasses) --------------------------------------------------------------------------------

    def stream_head(self, reply: _Reply) -> dict[str, Any] | None:
        return None

    def chunk(self, reply: _Reply, text: str, toks: list[TokenOutput], st: TextState) -> dict[str, Any]:
        raise NotImplementedError

    def usage_base(self, reply: _Reply) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, reply: _Reply, st: TextState) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class _Reply:
    """Per-request response fields."""

    id: str
    created: int
    model: str
    body: Any
    num_logprobs: int | None
    text_offset: int = 0


class CompletionsHandler(GenerationHandler):
    def tokenize(self, body: CompletionRequest) -> list[int]:
        prompt = body.single_prompt()
        if isinstance(prompt, list):
            return list(prompt)
        if not prompt:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        return self.ctx.tokenizer.encode(prompt, add_bos=True)

    def _logprobs(self, toks: list[TokenOutput], reply: _Reply) -> CompletionLogProbs:
        lp = CompletionLogProbs()
        for t in toks:
            text = self.token_text(t.token_id)
            top = {self.token_text(i): _clamp(v) for i, v in t.top_logprobs}
            top.setdefault(text, _clamp(t.logprob))
            lp.tokens.append(text)
            lp.token_logprobs.append(_clamp(t.logprob))
            lp.top_logprobs.append(top)
            lp.text_offset.append(reply.text_offset)
            reply.text_offset += len(text)
        return lp

    def _base(self, reply: _Reply) -> dict[str, Any]:
        return {"id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model}

    def chunk(self, reply: _Reply, text: str, toks: list[TokenOutput], st: TextState) -> dict[str, Any]:
        lp = self._logprobs(toks, reply) if reply.num_logprobs is not None else None
        choice = CompletionChoice(text=text, logprobs=lp, finish_reason=st.finish_reason,
                                  stop_reason=st.stop_reason if st.finished else None)
        return {**self._base(reply), "choices": [choice.model_dump()]}

    def usage_base(self, reply: _Reply) -> dict[str, Any]:
        return {**self._base(reply), "choices": []}

    def response(self, reply: _Reply, st: TextState) -> dict[str, Any]:
        lp = self._logprobs(st.take_logprobs(), reply) if reply.num_logprobs is not None else None
        return CompletionResponse(id=reply.id, created=reply.created, model=reply.model, usage=st.usage(),
                                  choices=[CompletionChoice(text=st.take(), logprobs=lp,
                                                            finish_reason=st.finish_reason,
                                                            stop_reason=st.stop_reason)]).model_dump()


class ChatHandler(GenerationHandler):
    request_cls = ChatCompletionRequest
    prompt_param = "messages"
    id_prefix = "chatcmpl"

    def tokenize(self, body: ChatCompletionRequest) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            return list(self.ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e) if str(e).startswith("messages") else f"messages: {e}"
            raise ApiError(400, msg, param="messages") from None

    def num_logprobs(self, body: ChatCompletionRequest) -> int | None:
        return body.num_logprobs()

    def _logprobs(self, toks: list[TokenOutput], n: int) -> ChatLogProbs:
        def entry(cls: type, tid: int, lp: float | None, **kw: Any) -> Any:
            text = self.token_text(tid)
            return cls(token=text, logprob=_clamp(lp) if lp is not None else MIN_LOGPROB,
                       bytes=list(text.encode("utf-8")), **kw)

        return ChatLogProbs(content=[
            entry(ChatTokenLogprob, t.token_id, t.logprob,
                  top_logprobs=[entry(TopLogprob, i, v) for i, v in t.top_logprobs[:n]]) for t in toks])

    def _base(self, reply: _Reply) -> dict[str, Any]:
        return {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model}

    def stream_head(self, reply: _Reply) -> dict[str, Any]:
        return {**self._base(reply), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}

    def chunk(self, reply: _Reply, text: str, toks: list[TokenOutput], st: TextState) -> dict[str, Any]:
        n = reply.num_logprobs
        lp = self._logprobs(toks, n).model_dump() if n is not None else None
        delta = {"content": text} if text or not st.finished else {}
        return {**self._base(reply), "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                  "finish_reason": st.finish_reason,
                                                  "stop_reason": st.stop_reason if st.finished else None}]}

    def usage_base(self, reply: _Reply) -> dict[str, Any]:
        return {**self._base(reply), "choices": []}

    def response(self, reply: _Reply, st: TextState) -> dict[str, Any]:
        n = reply.num_logprobs
        lp = self._logprobs(st.take_logprobs(), n) if n is not None else None
        return ChatCompletionResponse(id=reply.id, created=reply.created, model=reply.model, usage=st.usage(),
                                      choices=[ChatChoice(message=ChatResponseMessage(content=st.take()),
                                                          logprobs=lp, finish_reason=st.finish_reason,
                                                          stop_reason=st.stop_reason)]).model_dump()


class ModelsHandler:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def handle(self) -> JSONResponse:
        name = self.ctx.served_model_name
        card = ModelCard(id=name, created=self.ctx.created, root=name, max_model_len=self.ctx.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())


class AdminHandler:
    """GET /v1/admin/engine (behind the API key): the engine's live state: queues, KV usage, failed forwards,
    whether it is recovering from one."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def handle(self) -> JSONResponse:
        stats = self.ctx.engine.stats()
        return JSONResponse({"model": self.ctx.served_model_name, "accepting": self.ctx.engine.is_alive,
                             "max_model_len": self.ctx.engine.max_model_len,
                             "max_request_tokens": self.ctx.engine.max_request_tokens,
                             **dataclasses.asdict(stats)})


class HealthHandler:
    """200 while the engine accepts requests and the health check (the expert workers) passes, else 503. The
    check runs on a worker thread: a slow probe never blocks the event loop."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def handle(self) -> Response:
        try:
            ok = self.ctx.engine.is_alive and (self.ctx.health_check is None
                                               or bool(await anyio.to_thread.run_sync(self.ctx.health_check)))
        except Exception:
            log.exception("health check failed")
            ok = False
        return Response(status_code=200 if ok else 503)


async def version() -> JSONResponse:
    try:
        from importlib.metadata import version as dist_version

        v = dist_version("expertmesh")
    except Exception:
        v = "unknown"
    return JSONResponse({"version": v})


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:
        log.debug("cleanup failed", exc_info=True)


__all__ = ["AdminHandler", "ApiContext", "ApiLimits", "ChatHandler", "CompletionsHandler", "HealthHandler",
           "ModelsHandler", "version"]
