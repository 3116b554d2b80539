"""How errors of a Redis server read: what to check when it cannot be reached, its words."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.exceptions import ResponseError

__all__ = ["is_wrong_type", "sentence", "unreachable_hint"]


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
