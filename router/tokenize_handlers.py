"""POST /tokenize and /detokenize with vLLM's request and response shapes (the auth middleware guards them).

/tokenize takes {"model"?, "prompt", "add_special_tokens"? (default true)} or {"model"?, "messages",
"add_generation_prompt"? (default true), "add_special_tokens"? (default false: the chat template already holds
BOS)}, plus "return_token_strs"?, and answers {"count", "max_model_len", "tokens", "token_strs"}.
/detokenize takes {"model"?, "tokens": [ids]} and answers {"prompt"} (special tokens kept, as vLLM decodes).
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from .handlers import ApiContext, read_body
from .http_errors import ApiError, from_protocol, from_validation
from .openai_protocol import MAX_MESSAGES, ChatMessage, ProtocolError, parse_request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: StrictStr | None = None


class TokenizeRequest(_Body):
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ProtocolError("prompt: give either \"prompt\" (a string) or \"messages\", not both or neither",
                                "prompt" if self.messages is None else "messages")
        if self.messages is not None and not self.messages:
            raise ProtocolError("messages: must contain at least one message", "messages")
        return self


class DetokenizeRequest(_Body):
    tokens: list[StrictInt]


class _Handler:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def parse(self, request: Request, cls: type[_Body]) -> Any:
        raw = await read_body(request, self.ctx.limits.max_request_bytes)
        try:
            body = parse_request(raw, cls)  # type: ignore[arg-type]
        except ProtocolError as e:
            raise from_protocol(e) from None
        except ValidationError as e:
            errors = list(e.errors())
            exc = (errors[0].get("ctx") or {}).get("error") if errors else None
            raise (from_protocol(exc) if isinstance(exc, ProtocolError) else from_validation(errors)) from None
        if body.model is not None and body.model != self.ctx.served_model_name:
            raise ApiError(404, f"The model `{body.model[:200]}` does not exist.", param="model")
        return body


class TokenizeHandler(_Handler):
    async def handle(self, request: Request) -> JSONResponse:
        body: TokenizeRequest = await self.parse(request, TokenizeRequest)
        ids = await anyio.to_thread.run_sync(self.tokenize, body)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.ctx.engine.max_model_len, "tokens": ids,
                               "token_strs": None}
        if body.return_token_strs:
            backend = self.ctx.tokenizer.backend
            out["token_strs"] = [backend.id_to_token(i) for i in ids]
        return JSONResponse(out)

    def tokenize(self, body: TokenizeRequest) -> list[int]:
        tok = self.ctx.tokenizer
        if body.prompt is not None:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            return tok.encode(body.prompt, add_bos=add)
        messages = [m.model_dump(exclude_none=True) for m in body.messages or ()]
        try:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt))
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e) if str(e).startswith("messages") else f"messages: {e}"
            raise ApiError(400, msg, param="messages") from None
        # vLLM tokenizes the rendered template with add_special_tokens: true adds a second BOS, as there
        return [tok.bos_token_id, *ids] if body.add_special_tokens else ids


class DetokenizeHandler(_Handler):
    async def handle(self, request: Request) -> JSONResponse:
        body: DetokenizeRequest = await self.parse(request, DetokenizeRequest)
        vocab = self.ctx.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}]: token id {body.tokens[bad]} is out of vocabulary "
                                f"(0..{vocab - 1})", param="tokens")
        text = await anyio.to_thread.run_sync(
            lambda: self.ctx.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return JSONResponse({"prompt": text})


__all__ = ["DetokenizeHandler", "DetokenizeRequest", "TokenizeHandler", "TokenizeRequest"]
