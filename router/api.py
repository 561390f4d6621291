"""OpenAI-compatible HTTP server (vLLM conventions): completions, chat, models, health, SSE streaming."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from model.sampling import SamplingParams
from model.tokenizer import IncrementalDecoder

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
    UsageInfo,
    error_body,
)
from .requests import EngineDeadError, GenerationRequest, QueueFullError, RequestOutput, TokenOutput

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_S = 1
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
_NESTED_FIELDS = {"role", "content", "name", "include_usage"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers


class _Disconnected(Exception):
    """The client went away while its request was running."""


class _SSEResponse(StreamingResponse):
    """Closes its body generator when the response ends, so a disconnect runs the generator's cleanup now.

    (Starlette cancels the send on http.disconnect; a generator paused at `yield` would otherwise only be
    finalized by the garbage collector.)
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.status, e.param), status_code=e.status,
                        headers=e.headers)


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a 400 naming the field."""
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, ProtocolError):
        return ApiError(400, str(exc), param=exc.param)
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc else None
    for p in loc[1:]:
        if isinstance(p, int):
            param += f"[{p}]"
        elif p in _NESTED_FIELDS:
            param += f".{p}"
        else:
            break  # a union member tag, not a field
    msg = err.get("msg", "invalid value")
    if loc and loc[0] == "prompt" and err.get("type") != "missing":
        msg = "must be a string, a list of token ids, or a one-element list of either"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFullError):
        return ApiError(429, f"The server is overloaded ({e}); retry later", "RateLimitError",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineDeadError):
        return ApiError(503, f"The engine is not running: {e}", "ServiceUnavailableError")
    if isinstance(e, ValueError):  # the engine's messages start with the field name: "max_tokens: ..."
        head = str(e).split(":", 1)[0]
        return ApiError(400, str(e), param=head if head.isidentifier() else None)
    if isinstance(e, ApiError):
        return e
    log.exception("request failed", exc_info=e)
    return ApiError(500, f"Internal error: {type(e).__name__}: {e}", "InternalServerError")


def _clamp(lp: float | None) -> float | None:
    return None if lp is None else (MIN_LOGPROB if math.isnan(lp) else max(float(lp), MIN_LOGPROB))


class _TextState:
    """Engine tokens -> text: incremental detokenization, stop strings (held back while partial), counts."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str], stop_token_ids: list[int],
                 logprobs: bool):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops, self.stop_token_ids = stops, set(stop_token_ids)
        self.max_stop = max((len(s) for s in stops), default=0)
        self.want_logprobs = logprobs
        self.text, self.sent, self.checked = "", 0, 0
        self.num_prompt, self.num_generated = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.engine_done = False  # the engine finished the request itself (no abort needed)
        self.new_logprobs: list[TokenOutput] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: RequestOutput) -> None:
        for tok in out.tokens:
            if self.finished:
                break
            self.num_generated += 1
            if self.want_logprobs:
                self.new_logprobs.append(tok)
            self.text += self.decoder.step(tok.token_id)
            self._check_stop()
        if out.finished:
            self.engine_done = True
            if not self.finished:
                self.text += self.decoder.flush()
                self._check_stop()
            if not self.finished:
                self.error = out.error
                self.finish_reason = out.finish_reason or "stop"
                last = out.tokens[-1].token_id if out.tokens else None
                if self.finish_reason == "stop" and last in self.stop_token_ids:
                    self.stop_reason = last

    def _check_stop(self) -> None:
        if not self.stops:
            return
        start = max(self.sent, self.checked - self.max_stop + 1)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        self.checked = len(self.text)
        if hits:
            pos, stop = min(hits)
            self.text = self.text[:pos]
            self.finish_reason, self.stop_reason = "stop", stop

    def take(self) -> str:
        """Text ready to send: all of it once finished, else minus a tail that may begin a stop string."""
        end = len(self.text)
        if not self.finished:
            for k in range(min(self.max_stop - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        chunk, self.sent = self.text[self.sent:end], end
        return chunk

    def take_logprobs(self) -> list[TokenOutput]:
        out, self.new_logprobs = self.new_logprobs, []
        return out

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.num_prompt, completion_tokens=self.num_generated,
                         total_tokens=self.num_prompt + self.num_generated)


def build_app(engine: Any, tokenizer: Any, served_model_name: str, max_model_len: int,
              api_key: str | None = None, health_check: Callable[[], bool] | None = None,
              metrics_app: Any = None) -> FastAPI:
    """The OpenAI-compatible app over an AsyncEngine (generate/abort/is_alive) and a model Tokenizer."""
    app = FastAPI(title="expertmesh", openapi_url=None, docs_url=None, redoc_url=None)
    created = int(time.time())
    vocab_size = getattr(tokenizer, "vocab_size", None)
    token_text_cache: dict[int, str] = {}
    pending: set[asyncio.Future[Any]] = set()  # fire-and-forget cleanup tasks

    # --- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(e.status_code, "BadRequestError")
        return JSONResponse(error_body(str(e.detail), type_, e.status_code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=e)
        return JSONResponse(error_body(f"Internal error: {type(e).__name__}", "InternalServerError", 500),
                            status_code=500)

    # --- helpers --------------------------------------------------------------------------------------
    def is_alive() -> bool:
        alive = getattr(engine, "is_alive", True)
        return bool(alive() if callable(alive) else alive)

    def abort(request_id: str) -> None:
        try:
            res = engine.abort(request_id)
        except Exception:  # abort is best-effort cleanup
            log.exception("abort(%s) failed", request_id)
            return
        if inspect.isawaitable(res):
            background(res)

    def background(coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        pending.add(fut)
        fut.add_done_callback(pending.discard)

    def close_later(it: AsyncIterator[RequestOutput]) -> None:
        """Close the engine stream (a no-op once it ended) without awaiting inside a cancelled scope."""
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            background(_quietly(aclose()))

    def token_text(token_id: int) -> str:
        s = token_text_cache.get(token_id)
        if s is None:
            s = token_text_cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    async def parse(request: Request, cls: type) -> Any:
        raw = await request.body()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "The request body must be a JSON object")
        try:
            body = cls.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(list(e.errors())) from None
        if body.model is not None and body.model != served_model_name:
            raise ApiError(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model")
        return body

    def check_prompt(ids: list[int], what: str) -> None:
        if not ids:
            raise ApiError(400, f"{what}: the prompt is empty", param=what)
        if vocab_size is not None:
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"{what}: token id {bad} is out of vocabulary (0..{vocab_size - 1})",
                               param=what)
        if len(ids) >= max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                                f"your {what} has {len(ids)} tokens, leaving no room for a completion. "
                                f"Please reduce the length of the {what}.", param=what)

    def make_request(body: Any, prompt_ids: list[int], num_logprobs: int | None, what: str,
                     request_id: str, arrival: float) -> GenerationRequest:
        max_tokens = body.requested_max_tokens()
        mt_param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None \
            else "max_tokens"
        if max_tokens is None:
            max_tokens = max_model_len - len(prompt_ids)
        elif max_tokens < 1:
            raise ApiError(400, f"{mt_param}: must be at least 1, got {max_tokens}", param=mt_param)
        elif len(prompt_ids) + max_tokens > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in "
                                f"the {what}, {max_tokens} in the completion). Please reduce the length of "
                                f"the {what} or completion.", param=mt_param)
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p), top_k=body.top_k or 0, seed=body.seed,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos))
        try:
            sampling.validate()
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split(":")[0]) from None
        return GenerationRequest(request_id=request_id, prompt_ids=tuple(prompt_ids), sampling=sampling,
                                 logprobs=num_logprobs, arrival_time=arrival)

    async def wait_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def until_disconnect(request: Request, coro: Any) -> Any:
        """Await coro; raise _Disconnected (cancelling it) if the client goes away first."""
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise _Disconnected
        return task.result()

    async def start(gen_req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """`stream = await engine.generate(req)`: admission errors (queue full, invalid) become statuses."""
        try:
            if not is_alive():
                raise EngineDeadError("the engine is not accepting requests")
            res = engine.generate(gen_req)
            if inspect.isawaitable(res):
                res = await res
            return res.__aiter__()
        except Exception as e:
            raise _engine_error(e) from None

    def request_id_of(request: Request) -> str:
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
        return f"{rid}-{uuid.uuid4().hex[:8]}"

    # --- logprob formats ------------------------------------------------------------------------------
    def completion_logprobs(toks: list[TokenOutput], offset: int) -> tuple[CompletionLogProbs, int]:
        lp = CompletionLogProbs()
        for t in toks:
            text = token_text(t.token_id)
            top = {token_text(i): _clamp(v) for i, v in t.top_logprobs}
            top.setdefault(text, _clamp(t.logprob))
            lp.tokens.append(text)
            lp.token_logprobs.append(_clamp(t.logprob))
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    def chat_logprobs(toks: list[TokenOutput], n: int) -> ChatLogProbs:
        def entry(cls: type, tid: int, lp: float | None, **kw: Any) -> Any:
            text = token_text(tid)
            return cls(token=text, logprob=_clamp(lp) if lp is not None else MIN_LOGPROB,
                       bytes=list(text.encode("utf-8")), **kw)

        return ChatLogProbs(content=[
            entry(ChatTokenLogprob, t.token_id, t.logprob,
                  top_logprobs=[entry(TopLogprob, i, v) for i, v in t.top_logprobs[:n]]) for t in toks])

    # --- the generation loop shared by both endpoints -------------------------------------------------
    async def outputs(it: AsyncIterator[RequestOutput], st: _TextState) -> AsyncIterator[None]:
        """Feed engine outputs into st, yielding after each, until st is finished."""
        while not st.finished:
            out = await _anext(it)
            if out is None:  # the stream ended without a finished output
                st.engine_done = True
                st.text += st.decoder.flush()
                st.finish_reason = "abort"
                st.error = "the engine ended the request without finishing it"
            else:
                st.feed(out)
            yield

    async def run_to_end(request: Request, it: AsyncIterator[RequestOutput], st: _TextState,
                         rid: str) -> None:
        async def consume() -> None:
            async for _ in outputs(it, st):
                pass

        try:
            await until_disconnect(request, consume())
        except _Disconnected:
            raise
        except Exception as e:
            raise _engine_error(e) from None
        finally:
            if not st.engine_done:
                abort(rid)
            close_later(it)
        if st.error:
            raise failed(st.error)

    def failed(error: str) -> ApiError:
        if not is_alive():
            return ApiError(503, f"The engine stopped: {error}", "ServiceUnavailableError")
        return ApiError(500, f"Generation failed: {error}", "InternalServerError")

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def stream(it: AsyncIterator[RequestOutput], st: _TextState, rid: str,
               chunk: Callable[[str, list[TokenOutput], _TextState], dict[str, Any] | None],
               usage_chunk: dict[str, Any] | None, head: dict[str, Any] | None) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                if head is not None:
                    yield sse(head)
                async for _ in outputs(it, st):
                    if st.error:
                        err = failed(st.error)
                        yield sse(error_body(err.message, err.type, err.status))
                        break
                    c = chunk(st.take(), st.take_logprobs(), st)
                    if c is not None:
                        yield sse(c)
                else:
                    if usage_chunk is not None:
                        yield sse({**usage_chunk, "usage": st.usage().model_dump()})
            except Exception as e:  # after the headers went out, errors travel in-band
                err = _engine_error(e)
                yield sse(error_body(err.message, err.type, err.status, err.param))
            finally:
                if not st.engine_done:
                    abort(rid)
                close_later(it)
            yield "data: [DONE]\n\n"

        return _SSEResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- endpoints ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        body: CompletionRequest = await parse(request, CompletionRequest)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt: the prompt is empty", param="prompt")
            prompt_ids = tokenizer.encode(prompt, add_bos=True)
        else:
            prompt_ids = list(prompt)
        check_prompt(prompt_ids, "prompt")
        rid = request_id_of(request)
        gen_req = make_request(body, prompt_ids, body.logprobs, "prompt", rid, arrival)
        st = _TextState(tokenizer, prompt_ids, body.stop_list, list(body.stop_token_ids or ()),
                        body.logprobs is not None)
        resp_id, ts, model = f"cmpl-{rid}", int(time.time()), served_model_name
        it = await start(gen_req)
        if body.stream:
            offset = [0]

            def chunk(text: str, toks: list[TokenOutput], s: _TextState) -> dict[str, Any] | None:
                if not text and not toks and not s.finished:
                    return None
                lp = None
                if body.logprobs is not None:
                    lp, offset[0] = completion_logprobs(toks, offset[0])
                choice = CompletionChoice(text=text, logprobs=lp, finish_reason=s.finish_reason,
                                          stop_reason=s.stop_reason if s.finished else None)
                return {"id": resp_id, "object": "text_completion", "created": ts, "model": model,
                        "choices": [choice.model_dump()]}

            usage = ({"id": resp_id, "object": "text_completion", "created": ts, "model": model,
                      "choices": []} if body.include_usage else None)
            return stream(it, st, rid, chunk, usage, None)
        try:
            await run_to_end(request, it, st, rid)
        except _Disconnected:
            return Response(status_code=499)
        lp = completion_logprobs(st.take_logprobs(), 0)[0] if body.logprobs is not None else None
        resp = CompletionResponse(id=resp_id, created=ts, model=model, usage=st.usage(), choices=[
            CompletionChoice(text=st.take(), logprobs=lp, finish_reason=st.finish_reason,
                             stop_reason=st.stop_reason)])
        return JSONResponse(resp.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"messages: {e}" if not str(e).startswith("messages") else str(e),
                           param="messages") from None
        check_prompt(prompt_ids, "messages")
        rid = request_id_of(request)
        n_lp = body.num_logprobs()
        gen_req = make_request(body, prompt_ids, n_lp, "messages", rid, arrival)
        st = _TextState(tokenizer, prompt_ids, body.stop_list, list(body.stop_token_ids or ()),
                        n_lp is not None)
        resp_id, ts, model = f"chatcmpl-{rid}", int(time.time()), served_model_name
        it = await start(gen_req)
        base = {"id": resp_id, "object": "chat.completion.chunk", "created": ts, "model": model}
        if body.stream:
            def chunk(text: str, toks: list[TokenOutput], s: _TextState) -> dict[str, Any] | None:
                if not text and not toks and not s.finished:
                    return None
                lp = chat_logprobs(toks, n_lp).model_dump() if n_lp is not None else None
                return {**base, "choices": [{"index": 0, "delta": {"content": text} if text else {},
                                             "logprobs": lp, "finish_reason": s.finish_reason,
                                             "stop_reason": s.stop_reason if s.finished else None}]}

            head = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
            usage = {**base, "choices": []} if body.include_usage else None
            return stream(it, st, rid, chunk, usage, head)
        try:
            await run_to_end(request, it, st, rid)
        except _Disconnected:
            return Response(status_code=499)
        lp = chat_logprobs(st.take_logprobs(), n_lp) if n_lp is not None else None
        resp = ChatCompletionResponse(id=resp_id, created=ts, model=model, usage=st.usage(), choices=[
            ChatChoice(message=ChatResponseMessage(content=st.take()), logprobs=lp,
                       finish_reason=st.finish_reason, stop_reason=st.stop_reason)])
        return JSONResponse(resp.model_dump())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, created=created, root=served_model_name,
                         max_model_len=max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        try:
            ok = is_alive() and (health_check is None or bool(health_check()))
        except Exception:
            log.exception("health check failed")
            ok = False
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    if metrics_app is not None:
        route = Mount("/metrics", metrics_app)
        route.path_regex = re.compile("^/metrics(?P<path>.*)$")  # serve /metrics without a 307 to /metrics/
        app.router.routes.append(route)

    app.add_middleware(_AuthMiddleware, api_key=api_key)
    app.add_middleware(_RequestIdMiddleware)
    return app


async def _anext(it: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:
        log.debug("cleanup failed", exc_info=True)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("expertmesh")
    except Exception:
        return "unknown"


class _RequestIdMiddleware:
    """Echo X-Request-Id (or a fresh one) on every response and expose it to handlers via scope state."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), "")
        rid = rid.strip()[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _AuthMiddleware:
    """With an api key, /v1/* needs `Authorization: Bearer KEY` (else 401); /health and /metrics stay open."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (self.api_key and scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith("/v1")):
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)
