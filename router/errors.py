"""Errors the engine raises at admission, each with the HTTP status the API answers it with (a leaf module)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's typed admission errors; `status` is the HTTP status the API maps it to."""

    status = 500


class InvalidRequest(EngineError, ValueError):
    """A request the engine cannot honour; `param` names the field at fault (400 in the OpenAI error shape)."""

    status = 400

    def __init__(self, param: str | None, message: str):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message = param, message


class QueueFullError(EngineError, RuntimeError):
    """The engine's waiting queue is at its bound; the HTTP layer answers 429 with Retry-After."""

    status = 429


class EngineDeadError(EngineError, RuntimeError):
    """The engine loop is not running (it was shut down); the HTTP layer answers 503."""

    status = 503


# Statuses a finished RequestOutput carries in `error_status` when the engine ended it with an error.
STATUS_INTERNAL = 500  # the model failed on this request (non-finite logits, a forward that failed alone)
STATUS_UNAVAILABLE = 503  # the request waited longer than the queue timeout, or the engine stopped
