"""How errors of a Redis server read: what to check when it cannot be reached, its words."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "REFUSED_AT_ONCE",
    "Unanswered",
    "is_wrong_type",
    "sent_unanswered",
    "sentence",
    "unreachable_hint",
]

#: Why a command of a bounded block fails at once, sent nowhere (see ``redis_patience``).
REFUSED_AT_ONCE = "it left an earlier command unanswered just now"


class Unanswered(RedisTimeoutError):
    """Redis took these tasks' publishes and said nothing back: whether they run is unknown.

    They are not sent again: a stalled server runs the copy it has once it wakes, and a
    copy sent again would wait as long for nothing.
    """

    def __init__(self, message: str, task_ids: tuple[str, ...]) -> None:
        super().__init__(message)
        self.task_ids = task_ids


def unreachable_hint(role: str, url: str) -> str:
    """What to check when the Redis ``role`` at ``url`` cannot be reached."""
    if role != "broker":
        return f"Is redis-server running there? (the {role}: NBTASK_RESULT_URL)"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        start = f"redis-server --port 0 --unixsocket {parts.path}"
    else:
        start = f"redis-server --port {parts.port or 6379}"
    return (
        f"Is redis-server running there? (start one with: {start}, or unset NBTASK_BROKER "
        "to use the embedded cluster)"
    )


def sentence(exc: BaseException) -> str:
    """redis-py's message, ending with one stop (its own end with ".", "?" or nothing)."""
    text = str(exc).rstrip(".")
    return text if text.endswith("?") else f"{text}."


def is_wrong_type(exc: BaseException) -> bool:
    """Whether a command failed on a key of another type (``WRONGTYPE``)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def sent_unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` is a wait for Redis's answer to what was sent that timed out.

    Redis may then have run it (it is stalled, or its answer was lost on the way), unlike
    a connection that timed out or a command refused at once in a bounded block.
    """
    if not isinstance(exc, RedisTimeoutError):
        return False
    text = str(exc)
    return not text.startswith("Timeout connecting") and text != REFUSED_AT_ONCE
