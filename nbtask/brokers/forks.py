"""A forked process closes its copies of the broker connections it was forked with.

A fork copies every open file, sockets too: a worker's child forked by its supervisor, a
process forked by task code or by ``multiprocessing``. Such a process never talks on the
connections it inherited (each connection is used by the process that made it), but its
copy keeps a connection open after its maker exits: RabbitMQ then still sees the dead
process's consumer, keeps its unacknowledged deliveries from being given back and its
queue from being deleted, for as long as the copy lives; on Redis, a read its maker was
blocked in when it died could still be handed a message.

Closing a copy ends nothing for the process that made the connection: a socket closes
only with its last copy, and the copy is closed without ``shutdown()`` or a goodbye to
the broker (either would end the connection for its maker too). The socket object is
detached first, so nothing in the fork can later close, or shut down, the connection
through it, nor an unrelated file given the same number.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, TypeVar

__all__ = ["close_copies_in_forks"]

Owner = TypeVar("Owner")


def close_copies_in_forks(owner: Owner, sockets: Callable[[Owner], Iterable[Any]]) -> None:
    """In every process forked from this one, close ``sockets(owner)`` as it starts.

    ``sockets`` names the owner's connected sockets (``None`` for one not connected); it
    runs in the fork, where no other thread exists, so it takes no lock. Nothing is kept
    alive for it: an owner gone by then has nothing to close.
    """
    ref = weakref.ref(owner)

    def close() -> None:
        target = ref()
        if target is None:
            return
        with suppress(Exception):  # a fork must start whatever this meets
            for sock in list(sockets(target)):
                _close_copy(sock)

    os.register_at_fork(after_in_child=close)


def _close_copy(sock: Any) -> None:
    """Close this process's copy of ``sock``'s file, and leave the object closed."""
    if sock is None:
        return
    with suppress(OSError, ValueError, AttributeError):
        fd = sock.detach()
        if fd >= 0:
            os.close(fd)
