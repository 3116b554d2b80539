"""What py-amqp hands over from RabbitMQ, read as sent and never trusted.

That is the body and everything beside it (headers, the redelivered flag).

Anyone who can publish to nbtask's queues sets every property of a message, and can bind
a queue to an exchange and publish there with any routing key. The connection, channel
and message classes here keep py-amqp and kombu from expanding, re-coding or choking on
any of it: a message they cannot hand over as sent is marked refused (:func:`refusal_of`),
and the worker dead-letters it before reading its body.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from amqp.connection import NEGOTIATE_CAPABILITIES
from amqp.method_framing import frame_handler as _frame_handler
from amqp.serialization import decode_properties_basic, dumps, loads
from kombu.transport import pyamqp as _pyamqp

from nbtask.brokers.amqp_frames import read_confirm
from nbtask.brokers.amqp_reads import OVERSIZED_HEADER, BodyLimits, BufferedTCPTransport
from nbtask.brokers.redis_channels import entry_key

__all__ = [
    "DELIVERIES_HEADER",
    "ENTRY_HEADER",
    "GUARDED",
    "ID_HEADER",
    "body_of",
    "entry_of",
    "oversized",
    "read_headers",
    "redelivered",
    "refusal_of",
]

ID_HEADER = "nbtask-id"
DELIVERIES_HEADER = "nbtask-deliveries"
#: Beside an event on a reply queue: the id it was kept under on its client's stream.
ENTRY_HEADER = "nbtask-entry"

# kombu would decompress a body whose headers name a compression before nbtask sees it:
# a bz2 bomb of a few hundred bytes grows to hundreds of MB before any signature or size
# check. And py-amqp decodes a body whose content encoding names a text encoding, so one
# sent as latin-1 or UTF-16 would come out re-encoded, not as sent. These classes make
# kombu and py-amqp hand messages over as they arrived; one that names a compression or a
# text encoding is marked refused (nbtask never sends either), and its body is never
# decoded.
pyamqp: Any = _pyamqp


class _GuardedMessage(pyamqp.Message):  # type: ignore[misc]
    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        properties = msg.properties
        headers = properties.get("application_headers")
        self.refusal = ""
        #: The size of a body dropped unread (see ``BodyLimits``); 0 if none was.
        self.oversized = 0
        if isinstance(headers, dict) and OVERSIZED_HEADER in headers:
            size = headers[OVERSIZED_HEADER]
            # BodyLimits writes a whole number there; anyone can publish the header too,
            # with anything in it: never converted, since a raise here is kombu's, and
            # would leave the message unacknowledged and its consumer given nothing more.
            if type(size) is int and size >= 0:
                self.oversized = size
                self.refusal = f"its body of {size:,} bytes was too large to read"
            else:
                self.refusal = f"its {OVERSIZED_HEADER} header is not a size ({str(size)[:40]!r})"
        elif isinstance(headers, dict) and _UNREADABLE in headers:
            self.refusal = f"its properties cannot be read ({str(headers[_UNREADABLE])[:40]!r})"
        elif isinstance(headers, dict) and "compression" in headers:
            self.refusal = f"it names a compression ({str(headers['compression'])[:40]!r})"
            properties["application_headers"] = {
                k: v for k, v in headers.items() if k != "compression"
            }
        encoding = properties.get("content_encoding")
        if not self.refusal and encoding not in (None, "", "binary"):
            self.refusal = f"it names a content encoding ({str(encoding)[:40]!r})"
        super().__init__(msg, channel=channel, **kwargs)


class _GuardedChannel(pyamqp.Channel):  # type: ignore[misc]
    Message = _GuardedMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auto_decode = False  # bodies stay the bytes sent, whatever encoding they name


# py-amqp reads a message's properties as its frames arrive, before any of its code or
# nbtask's sees the message: a property that is not UTF-8 (a message id, a content type),
# a header timestamp past year 9999 or a header table nested a few thousand deep raises
# there, the connection is left mid-message and must be dropped, and RabbitMQ delivers
# the same message again to the next connection, for ever. The frame reader below reads
# such a header again as one that says so (nbtask never sends it), so the message is
# refused like the others above, and the connection carries on.
_UNREADABLE = "x-nbtask-unreadable"


# The same holds for the arguments of a delivery: whoever binds a queue to an exchange
# and publishes there chooses the routing key (and may name a non-UTF-8 one), and py-amqp
# raised reading it, after the message had been taken: the consumer, with its one
# unacknowledged message, got nothing more. Such arguments are read again with their
# short strings made UTF-8; the routing key then names no queue of nbtask's, so the
# worker refuses the message.
_CONTENT_ARGS = {(60, 60): "sLbss", (60, 71): "Lbssl", (60, 50): "Bsss"}  # deliver, get, return
_WIDTHS = {"L": 8, "l": 4, "B": 2, "b": 1}  # no two bits in a row in these
_BASIC_ACK = (60, 80)


def _guarded_frames(connection: Any, callback: Any) -> Callable[[Any], Any]:
    """py-amqp's frame reader, which survives a content header or delivery it cannot read."""

    def dispatch(channel: int, method: tuple[int, int], args: Any, content: Any) -> Any:
        try:
            return callback(channel, method, args, content)
        except Exception:
            kinds = _CONTENT_ARGS.get(method)
            if content is None or kinds is None or _args_read(kinds, args):
                raise  # not the arguments' fault
            return callback(channel, method, _readable_args(kinds, args), content)

    on_frame = _frame_handler(connection, dispatch)

    limits: BodyLimits = connection.body_limits

    def guarded(frame: Any) -> Any:
        frame = limits.screen(frame)
        if frame is None:  # a part of a body too large, dropped
            connection.bytes_recv += 1
            return False
        frame_type, channel, buf = frame
        confirm = read_confirm(buf) if frame_type == 1 else None
        if confirm is not None:
            # RabbitMQ's confirm of a publish, the most frequent frame of all: straight to
            # the channel's confirm listeners, as py-amqp's dispatch would hand it on.
            on_ack = _confirm_listener(connection, channel)
            if on_ack is not None:
                connection.bytes_recv += 1
                on_ack(*confirm)
                return True
        try:
            return on_frame(frame)
        except Exception as exc:
            frame_type, channel, buf = frame
            if frame_type != 2 or _reads(buf):
                raise  # not the header's fault (the header frame also delivers a bodyless one)
            return on_frame((frame_type, channel, _unreadable_header(buf, exc)))

    return guarded


def _confirm_listener(connection: Any, channel_id: int) -> Callable[[int, bool], None] | None:
    """The ``basic.ack`` handler of a channel that takes one as py-amqp would hand it on.

    None where py-amqp's dispatch does more (a closing channel ignores it, a caller waits
    for it): the frame then goes that way.
    """
    channel = (connection.channels or {}).get(channel_id)
    if channel is None or channel.is_closing or _BASIC_ACK in channel._pending:
        return None
    handler: Callable[[int, bool], None] | None = channel._callbacks.get(_BASIC_ACK)
    return handler


def _reads(buf: Any) -> bool:
    try:
        decode_properties_basic(buf, 12)
    except Exception:
        return False
    return True


def _args_read(kinds: str, args: Any) -> bool:
    try:
        loads(kinds, args, 4)
    except Exception:
        return False
    return True


def _readable_args(kinds: str, args: Any) -> bytes:
    """A method frame's ``args`` (after its class and method ids), short strings made UTF-8."""
    out, offset = [bytes(args[:4])], 4
    for kind in kinds:
        if kind == "s":
            size = args[offset]
            text = bytes(args[offset + 1 : offset + 1 + size]).decode("utf-8", "replace")
            data = text.encode()[:255].decode("utf-8", "ignore").encode()
            out.append(bytes((len(data),)) + data)
            offset += 1 + size
        else:
            out.append(bytes(args[offset : offset + _WIDTHS[kind]]))
            offset += _WIDTHS[kind]
    return b"".join(out)


def _unreadable_header(buf: Any, exc: BaseException) -> bytes:
    """The content header ``buf`` (class, weight, body size kept), its properties replaced."""
    table: bytes = dumps("F", [{_UNREADABLE: type(exc).__name__}])
    return bytes(buf[:12]) + struct.pack(">H", 0x2000) + table


class _GuardedConnection(pyamqp.Connection):  # type: ignore[misc]
    Channel = _GuardedChannel
    # Not asking RabbitMQ to announce that it blocks publishers (a memory or disk alarm):
    # py-amqp then reads the socket before every publish to catch that notice, nbtask
    # does nothing with it, and a blocked publish waits all the same. Whether a link went
    # stale is found out by reading its confirms (nbtask.brokers.amqp_links._collect).
    negotiate_capabilities: ClassVar[dict[str, bool]] = {
        **NEGOTIATE_CAPABILITIES,
        "connection.blocked": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: The bodies this connection does not read past a size (see ``BodyLimits``).
        self.body_limits = BodyLimits()
        super().__init__(*args, frame_handler=_guarded_frames, **kwargs)

    def blocking_read(self, timeout: float | None = None) -> Any:
        """py-amqp's, but a frame already read off the socket is taken without touching it.

        (py-amqp sets the socket's timeout, and back, around every frame it reads.)
        """
        transport = self.transport
        if isinstance(transport, BufferedTCPTransport):
            if timeout != 0:
                transport.flush_writes()  # the answer to a frame held may be awaited
            frame = transport.buffered_frame()
            if frame is None:
                frame = transport.read_frame_within(timeout)
        else:
            with transport.having_timeout(timeout):
                frame = transport.read_frame()
        return self.on_inbound_frame(frame)

    def Transport(  # py-amqp's name and arguments
        self,
        host: str,
        connect_timeout: Any,
        ssl: Any = False,
        read_timeout: Any = None,
        write_timeout: Any = None,
        **kwargs: Any,
    ) -> Any:
        # Plain TCP reads what the socket has at once (nbtask.brokers.amqp_reads); TLS
        # keeps py-amqp's transport, which reads through the SSL object's own buffer.
        timeouts = {"read_timeout": read_timeout, "write_timeout": write_timeout}
        if ssl:
            return super().Transport(host, connect_timeout, ssl, **timeouts, **kwargs)
        return BufferedTCPTransport(host, connect_timeout=connect_timeout, **timeouts, **kwargs)


class _GuardedTransport(pyamqp.Transport):  # type: ignore[misc]
    Connection = _GuardedConnection


class _GuardedSSLTransport(pyamqp.SSLTransport):  # type: ignore[misc]
    Connection = _GuardedConnection


#: The kombu transport classes to use, by URL scheme.
GUARDED = {"amqp": _GuardedTransport, "amqps": _GuardedSSLTransport}


def oversized(message: Any) -> int:
    """The size of a received message's body dropped unread for its size (0: none was)."""
    return int(getattr(message, "oversized", 0))


def refusal_of(message: Any) -> str:
    """Why a received message is refused before anything reads its body (``""``: it isn't)."""
    return str(getattr(message, "refusal", ""))


def read_headers(headers: object) -> tuple[str | None, int]:
    """The task id and redelivery count beside a message.

    Anyone may have set them, so anything malformed reads as absent (the worker then goes
    by the signed header).
    """
    if not isinstance(headers, Mapping):
        return None, 0
    task_id = headers.get(ID_HEADER)
    if isinstance(task_id, bytes):
        task_id = task_id.decode("utf-8", "replace")
    count = headers.get(DELIVERIES_HEADER)
    deliveries = count if isinstance(count, int) and 0 <= count < 1 << 31 else 0
    return (task_id if isinstance(task_id, str) and task_id else None), deliveries


def entry_of(headers: object) -> str:
    """The stream entry id beside an event (:data:`ENTRY_HEADER`); ``''`` if none is.

    Anyone who can publish to the reply queue may have set it, with anything in it: only
    a well-formed id is read, and it is a hint (see :mod:`~nbtask.brokers.amqp_overlap`).
    """
    if not isinstance(headers, Mapping):
        return ""
    entry = headers.get(ENTRY_HEADER)
    if isinstance(entry, bytes):
        entry = entry.decode("ascii", "replace")
    return entry if isinstance(entry, str) and entry_key(entry) is not None else ""


def body_of(message: Any) -> bytes:
    """The body as sent.

    py-amqp hands an empty body over as ``str`` (and decodes no other: see
    ``_GuardedChannel``).
    """
    body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body)


def redelivered(message: Any) -> bool:
    """The AMQP ``redelivered`` flag (kombu's virtual transports keep it in the payload)."""
    if message.delivery_info.get("redelivered"):
        return True
    payload = getattr(message, "_raw", None)
    return isinstance(payload, dict) and bool(payload.get("redelivered"))
