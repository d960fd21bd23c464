"""Ray Compiled Graph helpers for the Ray executor: a late graph, a broken channel, a teardown that never hangs."""

from __future__ import annotations

from typing import Any

from ray.exceptions import RayError, RayTaskError

from edgesplit.errors import first_line

CLOSE_TEARDOWN_WAIT = 2  # seconds; Ray's DAGContext wants an int


class CompiledLate(RayError):
    """The compiled graph did not answer within the deadline."""


def is_channel_error(exc: BaseException) -> bool:
    from ray.exceptions import RayChannelError

    return isinstance(exc, RayChannelError)


def quiet_teardown(dag: Any, kill_actors: bool = False) -> None:
    from ray.dag import DAGContext

    context = DAGContext.get_current()
    wait = context.teardown_timeout
    if kill_actors:  # the actors go anyway: do not wait Ray's 30 s for a loop stuck on a channel first
        context.teardown_timeout = min(wait, CLOSE_TEARDOWN_WAIT)
    try:
        dag.teardown(kill_actors=kill_actors)
    except Exception:  # noqa: BLE001 - a graph whose actor died may fail to tear down; nothing is left to free
        pass
    finally:
        context.teardown_timeout = wait


def cause_line(exc: BaseException) -> str:
    """What went wrong, in one line: for an error raised in an actor, the stage's own error, not Ray's wrapper."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return first_line(cause if isinstance(cause, BaseException) else exc)
