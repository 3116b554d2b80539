"""How errors of a Redis server read: what to check when it cannot be reached, its words.

And which of its error replies are refusals that pass (:func:`refusal`): a server that is
full, a read-only replica, one loading its data or busy with a long script answers, but
takes no writes for a while. nbtask treats those as an outage: what it writes waits.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "REFUSED_AT_ONCE",
    "REPLIES_LOST",
    "RepliesLost",
    "Unanswered",
    "is_wrong_type",
    "refusal",
    "sent_unanswered",
    "sentence",
    "unreachable_hint",
]

#: Why a command of a bounded block fails at once, sent nowhere (see ``redis_patience``).
REFUSED_AT_ONCE = "it left an earlier command unanswered just now"


#: What a command whose connection dropped before its replies came is said to have done.
REPLIES_LOST = (
    "The connection dropped after the command was sent, before Redis answered: Redis may "
    "have run it, so it was not sent again (a copy could run twice)"
)


class RepliesLost(RedisConnectionError):
    """The connection dropped once commands were written, before all their replies came.

    Redis may have run them: they are not sent again on a new connection.
    """


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


def sentence(exc: BaseException | str) -> str:
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


#: The error codes of a Redis refusing commands for a while, with what its state is and
#: what to do about it.
_PASSING = {
    "OOM": (
        "is full",
        "Free memory there or raise its maxmemory (an eviction policy would drop queued "
        "tasks and results)",
    ),
    "READONLY": (
        "is a read-only replica",
        "Point nbtask at its primary, or make it a primary again (REPLICAOF NO ONE)",
    ),
    "MASTERDOWN": (
        "is a replica that lost its primary",
        "Bring its primary back, or make it a primary (REPLICAOF NO ONE)",
    ),
    "LOADING": ("is loading its data into memory", "Wait for it to finish"),
    "BUSY": (
        "is busy running a script past its time limit",
        "Wait for it to end, or end it (SCRIPT KILL)",
    ),
    "MISCONF": (
        "cannot save its data to disk (stop-writes-on-bgsave-error)",
        "Read its log: free disk space, or fix its dir's permissions",
    ),
    "NOREPLICAS": (
        "has fewer good replicas than its min-replicas-to-write",
        "Bring its replicas back, or lower that setting",
    ),
    "UNBLOCKED": ("ended a waiting read (did it become a replica?)", "Check its role"),
}
_BY_CLASS = (
    (OutOfMemoryError, "OOM"),
    (ReadOnlyError, "READONLY"),
    (MasterDownError, "MASTERDOWN"),
    (BusyLoadingError, "LOADING"),  # (a connection error to redis-py)
)
# A code at the start of the reply, or after a script's words (Redis before 7 wraps the
# error a command met in a script: "Error running script (...): ...: -OOM command ...").
_CODE = re.compile(r"(?:^|: -)(" + "|".join(_PASSING) + r") ")
# Where Redis 7 says which script met it: "... script: <sha>, on @user_script:12."
_SCRIPT_WHERE = re.compile(r"\.?\s*script: \w+, on @user_script:\d+\.?$")


def refusal(exc: BaseException) -> tuple[str, str, str] | None:
    """How a Redis that refuses commands for a while (``exc``) is, its words, what to do.

    ``None`` unless ``exc`` is such a refusal: out of memory under ``noeviction``, a
    read-only replica, a replica without its primary, loading, busy with a script, unable
    to save, short of replicas, or an ended wait. Each passes; nothing was written.
    """
    if not isinstance(exc, (ResponseError, BusyLoadingError)):
        return None
    text = str(exc)
    code = next((code for kind, code in _BY_CLASS if isinstance(exc, kind)), None)
    if code is None:
        match = _CODE.search(text)
        if match is None:
            return None
        code, text = match[1], text[match.end() :]  # (a script's wrapping left out)
    state, advice = _PASSING[code]
    return state, sentence(_SCRIPT_WHERE.sub("", text)), advice
