"""The AMQP frames nbtask writes and reads for every message, built and read here.

py-amqp serialises a ``basic.publish`` through generic code: its arguments by format
string, its properties by walking all fourteen of them, then three frames packed one by
one. For every publish on a link they differ only in the routing key (the same for every
message to one queue), the headers and the body. Here the method frame's payload is
built once per routing key, the properties once per set of headers that is always the
same (an event's: none), and the frames are joined and written in one piece: the bytes
are those py-amqp writes (``tests/brokers/test_amqp_frames.py`` compares them).

The same holds for the ``basic.ack`` a worker sends for each task it settled, and for
the ``basic.ack`` RabbitMQ sends to confirm a publish: it is read here and handed to the
channel's confirm listeners without py-amqp's generic method dispatch.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from typing import Any

from amqp.serialization import dumps

__all__ = ["ack_frame", "publish_frames", "read_confirm"]

_END = b"\xce"
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEAD = struct.Struct(">HHQ")  # class (basic), weight, body size
_ACK = struct.Struct(">BHIHHQBB")  # the whole frame of a basic.ack
_ACK_ARGS = struct.Struct(">QB")  # delivery tag, flags (multiple)
_BASIC = 60
_PUBLISH = 40
_BASIC_ACK = b"\x00\x3c\x00\x50"  # class 60, method 80
#: content_type, content_encoding, application_headers, delivery_mode (property flags).
_FLAGS = b"\xf0\x00"
_TYPE_AND_ENCODING = b"\x18application/octet-stream\x06binary"
_INT_RANGE = range(-2147483647, 2147483648)  # what py-amqp writes as a 32-bit 'I'


@functools.lru_cache(maxsize=4096)
def _publish_method(routing_key: str, mandatory: bool) -> bytes:
    """The payload of a ``basic.publish`` to the default exchange (class, method, args)."""
    key = routing_key.encode("utf-8", "surrogatepass")
    head = struct.pack(">HHHBB", _BASIC, _PUBLISH, 0, 0, len(key))  # ticket, exchange ""
    return head + key + (b"\x01" if mandatory else b"\x00")  # mandatory; never immediate


def _table(headers: Mapping[str, Any]) -> bytes:
    """A header table as py-amqp writes it; nbtask's own values (str, int) written here."""
    parts = []
    for name, value in headers.items():
        key = name.encode("utf-8", "surrogatepass")
        if isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            parts.append(struct.pack(">B", len(key)) + key + b"S" + struct.pack(">I", len(data)))
            parts.append(data)
        elif type(value) is int and value in _INT_RANGE:
            parts.append(struct.pack(">B", len(key)) + key + b"I" + struct.pack(">i", value))
        else:  # anything else is written by py-amqp itself
            table: bytes = dumps("F", [headers])
            return table
    body = b"".join(parts)
    return struct.pack(">I", len(body)) + body


@functools.lru_cache(maxsize=4)
def _plain_properties(persistent: bool) -> bytes:
    return _properties({}, persistent)


def _properties(headers: Mapping[str, Any], persistent: bool) -> bytes:
    mode = b"\x02" if persistent else b"\x01"
    return _FLAGS + _TYPE_AND_ENCODING + _table(headers) + mode


def publish_frames(
    channel: int,
    frame_max: int,
    routing_key: str,
    raw: bytes,
    *,
    persistent: bool,
    headers: Mapping[str, Any],
    mandatory: bool,
) -> bytes:
    """The frames of one ``basic.publish`` of ``raw`` to the default exchange.

    ``frame_max`` is the connection's: a body larger than one frame holds is split.
    """
    method = _publish_method(routing_key, mandatory)
    props = _properties(headers, persistent) if headers else _plain_properties(persistent)
    header = _CONTENT_HEAD.pack(_BASIC, 0, len(raw)) + props
    parts = [
        _FRAME_HEAD.pack(1, channel, len(method)),
        method,
        _END,
        _FRAME_HEAD.pack(2, channel, len(header)),
        header,
        _END,
    ]
    chunk = frame_max - 8 if frame_max > 8 else len(raw) or 1
    for start in range(0, len(raw), chunk):
        piece = raw[start : start + chunk]
        parts += [_FRAME_HEAD.pack(3, channel, len(piece)), piece, _END]
    return b"".join(parts)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """The frame of a ``basic.ack`` of one delivery."""
    return _ACK.pack(1, channel, 13, _BASIC, 80, delivery_tag, 0, 0xCE)


def read_confirm(payload: Any) -> tuple[int, bool] | None:
    """``(delivery tag, multiple)`` if a method frame's payload is a ``basic.ack``."""
    if len(payload) != 13 or payload[:4] != _BASIC_ACK:
        return None
    tag, flags = _ACK_ARGS.unpack_from(payload, 4)
    return tag, bool(flags & 1)
