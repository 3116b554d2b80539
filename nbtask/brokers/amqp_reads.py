"""Reading RabbitMQ's frames off a plain TCP socket: what the socket has, at once.

py-amqp's TCP transport asks the socket for exactly the bytes it needs next: a frame's
7-byte header, then its payload, then its end octet, so three ``recv`` calls a frame and
nine for a delivered message (method, content header, body), confirms three each. A
client reading its events and a worker child taking tasks spend more on those system
calls than on anything else they do per frame. The transport here asks for what the
socket holds (up to :data:`READ_BYTES`) and keeps the rest for the frames after, where
py-amqp's own reads keep theirs (``_read_buffer``), so a timeout mid-frame leaves the
bytes read so far for the next read, as before.

Nothing else looks at the socket to learn whether a frame is waiting (py-amqp and kombu
read it only through the transport), so frames buffered here are never missed.

A write goes straight to the socket's descriptor, without the poll ``sendall`` makes
first on a socket with a timeout. Writes can be held too: frames written one after the
other (a worker's last event of a task, then the acknowledgement of its message) then
leave in one ``send``, and RabbitMQ gets them in one packet. Whoever reads first writes
what is held (see ``_GuardedConnection.blocking_read``), so nothing waits for the answer
to a frame that was never sent.

A delivery can be screened by its size before py-amqp gathers its body
(:class:`BodyLimits`): anyone who may publish to a client's reply queue (its name is in
every record the client sent) could otherwise make it hold a message as large as
RabbitMQ takes (128 MiB by default) to read as one event. Such a body is dropped frame
by frame as it arrives, and the message handed over empty, its properties replaced by
one header that says how large it was (:data:`OVERSIZED_HEADER`).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from amqp.serialization import dumps
from amqp.transport import TCPTransport as _TCPTransport

__all__ = ["OVERSIZED_HEADER", "READ_BYTES", "BodyLimits", "BufferedTCPTransport"]

#: The most one ``recv`` asks for beyond a frame's missing bytes. Small enough that
#: handing the rest on (a copy per frame) costs less than the system calls it saves.
READ_BYTES = 16_384

_RETRY = (errno.EAGAIN, errno.EINTR)
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_END = 0xCE
_BODY_SIZE = struct.Struct(">Q")  # in a content header, after its class id and weight
_DELIVER = struct.pack(">HH", 60, 60)  # basic.deliver, its method frame's first bytes
#: The one header of a delivery whose body was dropped unread: the body's size.
OVERSIZED_HEADER = "x-nbtask-oversized"
TCPTransport: Any = _TCPTransport  # py-amqp is not annotated


class BufferedTCPTransport(TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport, reading up to :data:`READ_BYTES` per ``recv``."""

    _read_buffer: bytes  # py-amqp's: bytes read and not yet handed over

    def buffered_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame if it was read whole already (as ``read_frame``); else None."""
        rbuf = self._read_buffer
        end = _frame_end(rbuf)
        if end is None or rbuf[end] != _FRAME_END:
            return None  # not all here yet (or malformed: read_frame says so)
        frame_type, channel, _ = _FRAME_HEAD.unpack_from(rbuf)
        self._read_buffer = rbuf[end + 1 :]
        return frame_type, channel, rbuf[7:end]

    def read_frame_within(self, timeout: float | None) -> tuple[int, int, Any]:
        """``read_frame`` waiting ``timeout`` seconds at most (``None``: the socket's own).

        What py-amqp's ``having_timeout`` does around it, without a generator per read
        (nothing of its TLS handling applies to plain TCP).
        """
        if timeout is None:
            return self.read_frame()  # type: ignore[no-any-return]
        sock = self.sock
        prev = sock.gettimeout()
        if prev != timeout:
            sock.settimeout(timeout)
        try:
            return self.read_frame()  # type: ignore[no-any-return]
        except OSError as exc:
            if exc.errno == errno.EWOULDBLOCK:
                raise TimeoutError() from exc
            raise
        finally:
            if timeout != prev:
                sock.settimeout(prev)

    def has_frame(self) -> bool:
        """Whether a whole frame was read off the socket already."""
        return _frame_end(self._read_buffer) is not None

    # Writes held back ------------------------------------------------------------------------
    _held: list[bytes] | None = None

    @property
    def holding(self) -> bool:
        """Whether writes are held now."""
        return self._held is not None

    def hold_writes(self) -> None:
        """Keep what is written from now on, to write it whole with :meth:`release_writes`."""
        if self._held is None:
            self._held = []

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._write = self._write_first

    def _write_first(self, data: Any) -> None:
        """``sendall``, but the first write straight to the descriptor.

        ``sendall`` on a socket with a timeout (py-amqp keeps one) polls before it
        writes: a system call per publish or acknowledgement for nothing, since the
        socket's buffer almost always has room, and a moment without the GIL in which
        another thread takes it while the frames wait. What does not fit (or a socket
        without a timeout, which the descriptor would block on just the same) goes by
        ``sendall``.
        """
        sock = self.sock
        try:
            written = os.write(sock.fileno(), data)
        except BlockingIOError:  # the socket's buffer is full: sendall waits for room
            written = 0
        if written < len(data):
            sock.sendall(memoryview(data)[written:])

    def write(self, s: Any) -> None:
        """py-amqp's write, or kept while writes are held (copied: py-amqp reuses its buffer)."""
        if self._held is not None:
            self._held.append(bytes(s))
        else:
            super().write(s)

    def flush_writes(self) -> None:
        """Write what was held so far (in one piece), holding on."""
        held = self._held
        if held:
            data = b"".join(held)
            held.clear()
            super().write(data)

    def release_writes(self) -> None:
        """Write what was held, and write at once again from now on."""
        try:
            self.flush_writes()
        finally:
            self._held = None

    def drop_writes(self) -> None:
        """Forget what was held (the connection is being given up), writing at once again."""
        self._held = None

    def _read(self, n: int, initial: bool = False, _errnos: Any = _RETRY) -> bytes:
        """Exactly ``n`` bytes: from what was read before, then from the socket."""
        recv = self._quick_recv
        rbuf = self._read_buffer
        try:
            while len(rbuf) < n:
                try:
                    s = recv(max(n - len(rbuf), READ_BYTES))
                except OSError as exc:
                    if exc.errno in _errnos:
                        if initial and self.raise_on_initial_eintr:
                            raise TimeoutError() from exc
                        continue
                    raise
                if not s:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += s
        except BaseException:
            # A timeout (or an error) keeps what arrived, for the next read.
            self._read_buffer = rbuf
            raise
        result, self._read_buffer = rbuf[:n], rbuf[n:]
        return result


def _frame_end(rbuf: bytes) -> int | None:
    """Where the first frame in ``rbuf`` ends (its end marker's index), if all of it is in."""
    if len(rbuf) < 8:
        return None
    end = 7 + int.from_bytes(rbuf[3:7], "big")
    return end if len(rbuf) > end else None


Frame = tuple[int, int, Any]  # type, channel, payload


class BodyLimits:
    """The largest body taken from the consumers whose tags start with given prefixes.

    One per py-amqp connection: every frame it reads passes :meth:`screen` before py-amqp
    assembles messages out of them.
    """

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}  # consumer tag prefix: largest body
        self._next: dict[int, int] = {}  # AMQP channel: its delivery's limit, header to come
        self._dropping: dict[int, int] = {}  # AMQP channel: body bytes still to drop

    def limit(self, tag_prefix: str, most: int) -> None:
        """Drop the bodies over ``most`` bytes of the deliveries to ``tag_prefix``'s consumers."""
        self._limits[tag_prefix] = most

    def screen(self, frame: Frame) -> Frame | None:
        """``frame`` as py-amqp should see it; None for one dropped (an oversized body's)."""
        kind, channel, payload = frame
        if kind == 3 and channel in self._dropping:
            left = self._dropping[channel] - len(payload)
            if left > 0:
                self._dropping[channel] = left
            else:
                del self._dropping[channel]
            return None
        if kind == 1:
            self._next.pop(channel, None)
            if self._limits and bytes(payload[:4]) == _DELIVER:
                # Its arguments start with the consumer tag (a short string).
                tag = bytes(payload[5 : 5 + payload[4]]).decode("utf-8", "replace")
                for prefix, most in self._limits.items():
                    if tag.startswith(prefix):
                        self._next[channel] = most
        elif kind == 2 and channel in self._next:
            most = self._next.pop(channel)
            (size,) = _BODY_SIZE.unpack_from(payload, 4)
            if size > most:
                # Bodyless from here on: the body frames that follow are dropped as read.
                self._dropping[channel] = size
                table: bytes = dumps("F", [{OVERSIZED_HEADER: size}])
                header = bytes(payload[:4]) + _BODY_SIZE.pack(0) + struct.pack(">H", 0x2000)
                return kind, channel, header + table
        return frame
