"""RESP on one redis-py connection: commands packed, a batch's replies read, a closed socket.

The byte-level part of :class:`~nbtask.brokers.redis_link.RedisLink`'s lean pipeline,
below its per-thread connections, scripts, errors and unanswered publishes: commands are
packed by hiredis directly (large arguments sent as they are, never copied), a batch's
replies are read under one timeout, and a socket the server closed is told apart from
an open one without waiting. Kept apart so the link reads as what it does with a
connection, not how the bytes go; the link calls these functions directly.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.exceptions import ResponseError

__all__ = [
    "LARGE_BYTES",
    "Command",
    "as_text",
    "closed_by_server",
    "pack",
    "pack_one",
    "read_replies",
    "send_first",
]

#: Arguments from this size on are sent as they are, never copied into one buffer.
LARGE_BYTES = 1 << 20
#: A Redis command: its name, then its arguments.
Command = tuple[Any, ...]


def pack_one(command: Command) -> bytes:
    """RESP-encode ``command`` with hiredis, its numbers written out here first.

    hiredis writes a number with ``repr()``, which first runs the pending signal handlers:
    a ``KeyboardInterrupt`` (Ctrl-C) raised there leaves hiredis with a NULL that crashes
    the whole process (hiredis 3.5). Raised here, it is an ordinary exception.
    """
    # A list built first: half the cost of a tuple from a generator, on every command.
    args: Any = [a if a.__class__ is str or a.__class__ is bytes else _text(a) for a in command]
    packed: bytes = pack_command(tuple(args))
    return packed


def as_text(command: Command) -> Command:
    """``command`` with its numbers written out: one kept for reuse is packed without them."""
    return tuple(a if a.__class__ is str or a.__class__ is bytes else _text(a) for a in command)


def _text(arg: Any) -> Any:
    """A number as hiredis would write it (``float`` subclasses too); anything else as is."""
    if isinstance(arg, float):
        return float.__repr__(arg)
    if arg.__class__ is int:
        return int.__repr__(arg)
    return arg  # a memoryview, or a type hiredis refuses with a TypeError


def pack(commands: Sequence[Command]) -> list[bytes | memoryview]:
    """RESP-encode ``commands``; large arguments are sent as they are, never copied.

    (redis-py with hiredis packs everything into one buffer: for a 50 MB argument that
    copy costs more than sending it.)
    """
    chunks: list[bytes | memoryview] = []
    for command in commands:
        head = [b"*%d\r\n" % len(command)]
        for arg in command:
            data = arg if isinstance(arg, (bytes, memoryview)) else str(arg).encode()
            if len(data) >= LARGE_BYTES:
                chunks += [b"".join((*head, b"$%d\r\n" % len(data))), data]
                head = [b"\r\n"]
            else:
                head.append(b"$%d\r\n%s\r\n" % (len(data), data))
        chunks.append(b"".join(head))
    return chunks


def read_replies(connection: Any, count: int, block_seconds: float, replies: list[Any]) -> None:
    """Read ``count`` replies on ``connection`` into ``replies``, error replies in place.

    ``block_seconds`` is how long a blocking command may wait, added to the socket's read
    timeout for the batch. ``replies`` fills as they come: a caller whose connection fails
    midway must know whether the server already ran some of the commands.
    """
    stretched = block_seconds and connection._sock is not None
    if stretched:
        # Once for the whole batch (redis-py would set and reset it around every read).
        connection._sock.settimeout(block_seconds + (connection.socket_timeout or 5.0))
    try:
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    finally:
        if stretched and connection._sock is not None:
            connection._sock.settimeout(connection.socket_timeout)


def send_first(connection: Any, chunks: Sequence[bytes | memoryview]) -> bool:
    """Send ``chunks`` on a redis-py ``connection``, writing before letting go of the GIL.

    ``sendall`` on a socket with a timeout (redis-py sets one) polls before it writes: a
    thread waiting for the GIL takes it there (in a kernel, its IOPub and history threads
    at the start of every cell), and the command leaves only once that thread gives it
    back. The first chunk is written straight to the descriptor instead, so it is on its
    way before this thread waits for anyone; the rest, and anything on a TLS socket or a
    connection not yet made, goes by redis-py (which connects it).

    Returns False, nothing sent, when the first write is refused (the server reset the
    connection); raises redis-py's errors for anything after it.
    """
    sock = connection._sock  # redis-py has no public accessor
    if sock is not None and sock.__class__ is socket.socket and chunks:
        first = chunks[0]
        try:
            written = os.write(sock.fileno(), first)
        except BlockingIOError:  # the socket's buffer is full: sendall waits for room
            written = 0
        except OSError:
            return False
        rest = [memoryview(first)[written:]] if written < len(first) else []
        chunks = [*rest, *chunks[1:]]
        if not chunks:
            return True
    connection.send_packed_command(chunks)
    return True


def closed_by_server(sock: socket.socket | None) -> bool:
    """Whether ``sock`` is missing or the server closed it (it reads as at its end)."""
    if sock is None:
        return True
    # Polled first: a socket with a timeout (redis-py sets one) would wait for data to
    # peek at, and most of the time there is none.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False  # nothing to read: open, every reply read
    try:
        # On the socket itself: a TLS one (rediss://) refuses flags. Its bytes are
        # encrypted, but only "some" or "the end" matters here.
        return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the server
        return True
