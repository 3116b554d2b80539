"""RESP on one redis-py connection: commands packed, a batch's replies read, a closed socket.

The byte-level part of :class:`~nbtask.brokers.redis_link.RedisLink`'s lean pipeline,
below its per-thread connections, scripts, errors and unanswered publishes: commands are
packed by hiredis directly (large arguments sent as they are, never copied), a batch's
replies are read under one timeout, and a socket the server closed is told apart from
an open one without waiting. Kept apart so the link reads as what it does with a
connection, not how the bytes go; the link calls these functions directly.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import socket
from collections.abc import Sequence
from typing import Any

import redis
from hiredis import pack_command
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask._process import current_pid

__all__ = [
    "LARGE_BYTES",
    "Command",
    "as_text",
    "closed_by_server",
    "pack",
    "pack_one",
    "read_replies",
    "read_reply",
    "send_first",
]

#: Arguments from this size on are sent as they are, never copied into one buffer.
LARGE_BYTES = 1 << 20
#: A Redis command: its name, then its arguments.
Command = tuple[Any, ...]
#: What redis-py says of a connection the server closed.
SERVER_CLOSED = "Connection closed by server."
#: The attribute of a redis-py connection that keeps its poll object (:func:`_poll_of`).
_POLL = "_nbtask_poll"
log = logging.getLogger(__name__)


def _hiredis_parts() -> tuple[Any, Any]:
    """redis-py's hiredis parser class, and what its reader returns for "no whole reply yet".

    Private to redis-py: (None, None) where a release moved them (its replies are then
    read by redis-py throughout).
    """
    try:
        parsers = importlib.import_module("redis._parsers.hiredis")
    except ImportError:
        return None, None
    return getattr(parsers, "_HiredisParser", None), getattr(parsers, "NOT_ENOUGH_DATA", None)


_HiredisParser, NOT_ENOUGH_DATA = _hiredis_parts()
#: Whether this redis-py's hiredis connections have what :func:`_read` reads (private
#: fields of its parser): None until the first connected one tells (:func:`_fits`).
_fitting: list[bool | None] = [
    None if _HiredisParser is not None and NOT_ENOUGH_DATA is not None else False
]
#: An attribute that is not there (None may be a field's value).
_MISSING = object()


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

    ``block_seconds`` is how long a blocking command may wait, added to the read timeout
    for the batch. ``replies`` fills as they come: a caller whose connection fails midway
    must know whether the server already ran some of the commands.
    """
    timeout = connection.socket_timeout
    stretched = block_seconds + (timeout or 5.0) if block_seconds else None
    if _lean(connection):
        wait = connection._sock.gettimeout() if stretched is None else stretched
        for _ in range(count):
            replies.append(_read(connection, wait))
        return
    if stretched is not None and connection._sock is not None:
        # Once for the whole batch (redis-py would set and reset it around every read).
        connection._sock.settimeout(stretched)
    try:
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    finally:
        if stretched is not None and connection._sock is not None:
            connection._sock.settimeout(timeout)


def read_reply(connection: Any) -> Any:
    """Read one reply on ``connection`` as redis-py's ``read_response`` does (errors raised).

    For a command sent a while before (a publish sent without waiting): its reply has
    most likely come, and is read before waiting for it.
    """
    if not _lean(connection):
        return connection.read_response()
    reply = _read(connection, connection._sock.gettimeout(), sent_before=True)
    if isinstance(reply, ResponseError):
        raise reply
    return reply


def _lean(connection: Any) -> bool:
    """Whether ``connection``'s replies are read here: a plain socket, hiredis, no pings.

    A TLS socket (its bytes need decrypting), redis-py's own parser, a connection that
    pings between commands (``health_check_interval``), or any where this redis-py's
    parser lacks the fields read here (:func:`_fits`) is read by redis-py.
    """
    return (
        (_fitting[0] or (_fitting[0] is None and _fits(connection)))
        and connection._sock.__class__ is socket.socket
        and connection._parser.__class__ is _HiredisParser
        and not connection.health_check_interval
    )


def _fits(connection: Any) -> bool:
    """Whether this redis-py's hiredis connections have what :func:`_read` reads.

    The reader reads redis-py's private fields (the parser's hiredis reader and buffer),
    which a release may rename: told once, by the first connected hiredis connection
    (:data:`_fitting`). Where they do not fit, every reply is read by redis-py; until a
    connection tells, this one's are.
    """
    parser = getattr(connection, "_parser", _MISSING)
    sock = getattr(connection, "_sock", _MISSING)
    fits = parser is not _MISSING and sock is not _MISSING
    if fits:
        if parser.__class__ is not _HiredisParser or sock is None:
            return False  # redis-py's own parser, or not connected: no hiredis reader yet
        reader: Any = getattr(parser, "_reader", _MISSING)
        if reader is None:
            return False  # disconnected meanwhile
        buffer = getattr(parser, "_buffer", _MISSING)
        fits = (
            all(callable(getattr(reader, name, None)) for name in ("gets", "feed", "has_data"))
            and isinstance(buffer, bytearray)
            and len(buffer) > 0
            and callable(getattr(connection, "_host_error", None))
            and hasattr(connection, "health_check_interval")
        )
        if fits:
            if reader.has_data():
                return False  # part of a reply in: a later look tells
            # Empty, the reader answers what redis-py made it say for "not yet".
            fits = reader.gets() is NOT_ENOUGH_DATA
    _fitting[0] = fits
    if not fits:
        log.debug(
            "redis-py %s: its hiredis parser lacks the fields nbtask reads replies with; "
            "they are read by redis-py",
            redis.__version__,
        )
    return fits


def _read(connection: Any, wait: float | None, *, sent_before: bool = False) -> Any:
    """One reply on a :func:`_lean` connection, an error reply returned, not raised.

    What redis-py's ``read_response`` does, less what costs on every reply: its error
    text built in advance, and the socket's own wait before each read (a system call
    each, and two more to change it for a blocking command). Here the wait is one
    ``poll`` for at most ``wait`` seconds (the socket's timeout, as redis-py waits, or a
    blocking command's), and the read goes to the descriptor. A wait that runs out, a
    connection closed or reset, or an interruption drops the connection, as redis-py's
    does, with redis-py's errors. ``sent_before``: the reply has most likely come; the
    descriptor is read before waiting (one system call where it has, one more if not).
    """
    reader = connection._parser._reader
    reply = reader.gets()
    if reply is not NOT_ENOUGH_DATA:
        return reply
    sock = connection._sock
    fd = sock.fileno()
    buffer = connection._parser._buffer
    poller = _poll_of(connection, fd)
    timeout_ms = None if wait is None else wait * 1000.0
    try:
        while reply is NOT_ENOUGH_DATA:
            if not sent_before and not poller.poll(timeout_ms):
                raise RedisTimeoutError(f"Timeout reading from {connection._host_error()}")
            sent_before = False
            try:
                got = os.readv(fd, [buffer])
            except BlockingIOError:  # woken with nothing to read after all: wait again
                continue
            except OSError as exc:
                raise RedisConnectionError(
                    f"Error while reading from {connection._host_error()} : {exc.args}"
                ) from exc
            if not got:
                raise RedisConnectionError(SERVER_CLOSED)
            reader.feed(buffer, 0, got)
            reply = reader.gets()
    except BaseException:
        connection.disconnect()  # half read: never reused
        raise
    # (As redis-py's parser checks: a refusal that ends the connection, alone or first.)
    first = reply[0] if reply.__class__ is list and reply else reply
    if isinstance(first, RedisConnectionError):
        connection.disconnect()
        raise first
    return reply


def _poll_of(connection: Any, fd: int) -> Any:
    """The poll object kept on ``connection``, for its socket's descriptor ``fd``.

    Made and registered once, not for every reply waited for and every look at an idle
    connection (a few hundred nanoseconds each time). A connection made anew may have
    another descriptor, and then gets a new one. A poll object holds descriptor numbers
    only, no kernel state (unlike epoll's), but a fork also copies whether a thread of the
    parent was in its ``poll()`` (the copy would then refuse to poll): each process makes
    its own (though a fork never reads its parent's connections: it makes its own too).
    """
    kept: tuple[int, int, Any] | None = getattr(connection, _POLL, None)
    pid = current_pid()
    if kept is None or kept[0] != fd or kept[1] != pid:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        kept = (fd, pid, poller)
        setattr(connection, _POLL, kept)
    return kept[2]


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


def closed_by_server(connection: Any) -> bool:
    """Whether ``connection`` is not connected, or the server closed it (reads as at its end).

    On a :func:`_lean` connection, what there is to read is read into its parser rather
    than peeked at: the reply it holds is then read without waiting or reading again.
    """
    sock = connection._sock  # redis-py has no public accessor
    if sock is None:
        return True
    lean = _lean(connection)
    if lean and sock.gettimeout() is not None:
        # A socket with a timeout is non-blocking underneath: read at once, one system
        # call whether or not something came (a reply owed for a publish most often has).
        return not _read_ahead(connection)
    # Polled first: a blocking socket would wait for data to read or peek at, and most of
    # the time there is none.
    if not _poll_of(connection, sock.fileno()).poll(0):
        return False  # nothing to read: open, every reply read
    if lean:
        return not _read_ahead(connection)
    try:
        # On the socket itself: a TLS one (rediss://) refuses flags. Its bytes are
        # encrypted, but only "some" or "the end" matters here.
        return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the server
        return True


def _read_ahead(connection: Any) -> bool:
    """Read what has come on a :func:`_lean` connection into its parser; False at its end."""
    buffer = connection._parser._buffer
    try:
        got = os.readv(connection._sock.fileno(), [buffer])
    except BlockingIOError:
        return True
    except OSError:  # reset by the server
        return False
    if got:
        connection._parser._reader.feed(buffer, 0, got)
    return bool(got)
