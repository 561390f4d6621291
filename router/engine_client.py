"""What the HTTP layer needs from an engine (a leaf module): router.engine.AsyncEngine implements it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from .requests import EngineStats, GenerationRequest, RequestOutput


class EngineClient(Protocol):
    @property
    def is_alive(self) -> bool:
        """False once it stopped accepting requests (shut down)."""

    @property
    def max_model_len(self) -> int:
        """Prompt plus completion tokens the model's context allows."""

    @property
    def max_request_tokens(self) -> int:
        """Prompt plus completion tokens one request can hold (the context and the KV cache bound it)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Admit the request (raising router.errors.EngineError subclasses), then stream its outputs."""

    def abort(self, request_id: str) -> None:
        """Finish the request with "abort" and free what it holds (no-op when unknown or finished)."""

    def stats(self) -> EngineStats:
        """The engine's live counters (GET /v1/admin/engine)."""
