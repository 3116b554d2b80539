"""What a thread owes Redis: the replies to task publishes it sent without waiting.

:meth:`~nbtask.brokers.redis_link.RedisLink.send_unanswered` sends them, and the link
reads their replies later (sending again what needs it).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

from nbtask.brokers.handoffs import Publish
from nbtask.brokers.redis_resp import LARGE_BYTES, Command

__all__ = ["OWED_BYTES", "Owed", "looking", "unanswered"]

#: Bytes of publishes a thread may have sent unanswered (kept to be sent again) before
#: its next send reads Redis's replies: a loop sending large arguments holds little.
OWED_BYTES = 16 << 20


@dataclasses.dataclass
class Owed:
    """Task publishes one thread sent on its connection whose replies it has not read.

    ``sent`` holds ``(command, task id)``, oldest first. Kept by the link too while not
    empty, so a thread that ends owing replies does not close the connection under them,
    and a link that closes reads them (once the thread is done with the connection).
    """

    connection: Any
    pid: int
    sent: list[tuple[Command, str]] = dataclasses.field(default_factory=list)
    size: int = 0  # bytes of the commands in ``sent``, kept to be sent again
    thread: threading.Thread = dataclasses.field(default_factory=threading.current_thread)
    #: Held by the thread while it uses the connection, and by another that reads the
    #: replies for it (a closing link): two threads never read one connection.
    using: threading.RLock = dataclasses.field(default_factory=threading.RLock)


def unanswered(messages: Sequence[Publish], wait: bool) -> Publish | None:
    """The message of a send that need not wait for Redis's reply, if it is one.

    A lone message, small enough for a script argument, whose sender does not wait (it
    made the task id itself, so no refusal can come back).
    """
    if wait or len(messages) != 1 or len(messages[0].raw) >= LARGE_BYTES:
        return None
    return messages[0]


def looking(command: Command) -> Command:
    """A publish script's command sent as new (ARGV[7] ``"1"``), as one that looks first.

    An id its sender just drew is written without looking whether a task holds it
    (:data:`~nbtask.brokers.scripts.WRITE_PENDING`); sent again (its connection dropped
    before Redis answered) it must look: the first copy may have run, and its task may
    be queued, running or ended already. ``command`` is ``EVALSHA sha numkeys keys...
    args...``.
    """
    at = 3 + int(command[2]) + 6
    return (*command[:at], "0", *command[at + 1 :])
