"""What an actor's start-up raised, for a one-line start-up error instead of Ray's wrapped traceback."""

from __future__ import annotations

import ray


def original_error(err: ray.exceptions.RayError) -> BaseException | None:
    """The exception the actor's code raised: a method's (RayTaskError keeps it as `cause`) or its constructor's
    (Ray's ActorDiedError keeps the creation task's RayTaskError as its first argument); None when unknown."""
    if isinstance(err, ray.exceptions.RayActorError):
        if not err.actor_init_failed:
            return None
        err = err.args[0] if err.args else None
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else None


def startup_error(err: ray.exceptions.RayError) -> BaseException:
    """The actor's own ValueError (bad input, e.g. --bind-host: the CLI prints it as one line), else err."""
    cause = original_error(err)
    return cause if isinstance(cause, ValueError) else err
