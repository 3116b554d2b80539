"""Publisher confirms on AMQP: what one channel sent that RabbitMQ has not confirmed yet.

Every channel of the AMQP transport is in confirm mode. A publish is not waited for one
by one: it gets the channel's next sequence number and is kept, bytes and all, until
RabbitMQ acknowledges it (``basic.ack``, often for many at once with ``multiple``). A
batch is published whole and its confirms awaited together; a single ``delay()``
returns once its message is written and its confirm is collected by a later call.
A message whose connection dropped before its confirm arrived is sent again on a new
connection (a copy that did get through is dropped by the start check); one RabbitMQ
refused (``basic.nack``) is kept aside for its sender to report.

Task messages are published ``mandatory``: one whose queue is gone (deleted after this
channel declared it) comes back (``basic.return``, before its ``basic.ack``) instead of
being dropped, and is kept aside for its sender to declare the queue and send it again.

A message larger than RabbitMQ's ``max_message_size`` is refused by closing the channel:
everything unconfirmed on it is in doubt, and is sent again on a new connection, except
the messages over the size the refusal names, which would close that one too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["Confirms", "Outgoing", "size_limit"]

log = logging.getLogger(__name__)
#: RabbitMQ's words (406, on basic.publish) for a message over its ``max_message_size``.
_TOO_LARGE = re.compile(r"message size \d+ is larger than (?:configured )?max size (\d+)")


def size_limit(exc: BaseException | None) -> int | None:
    """RabbitMQ's largest message in bytes, if ``exc`` is its refusal of a larger one."""
    found = _TOO_LARGE.search(str(getattr(exc, "reply_text", "")))
    if found is None or getattr(exc, "reply_code", None) != 406:
        return None
    return int(found.group(1))


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One published message, kept until RabbitMQ confirms it (so it can be sent again).

    ``task_id`` is set for task messages (events have none); ``call`` numbers the
    :meth:`~nbtask.brokers.amqp_links.Links.publishing` call that sent it first;
    ``returns`` counts the times RabbitMQ returned it (its queue was gone).
    """

    routing_key: str
    raw: bytes
    persistent: bool
    headers: Mapping[str, Any]
    task_id: str | None
    call: int
    returns: int = 0


class Confirms:
    """The publisher confirms of one channel, put in confirm mode here.

    Parameters
    ----------
    channel
        A py-amqp channel (``confirm_select`` is sent once, here). kombu's in-process
        channels (``memory://``) have no confirms: a publish there is done when it returns.
    """

    def __init__(self, channel: Any) -> None:
        self._next = 1  # RabbitMQ numbers a confirm-mode channel's publishes from 1
        #: Sent and not yet confirmed, by sequence number (oldest first).
        self.unconfirmed: dict[int, Outgoing] = {}
        #: Refused by RabbitMQ (``basic.nack``), for the sender to report.
        self.refused: list[Outgoing] = []
        #: Returned by RabbitMQ (no queue to route to), for the sender to send again.
        self.returned: dict[int, Outgoing] = {}
        #: Publishes since the sender last read the confirms in (it reads now and then).
        self.sent_since_read = 0
        #: When a confirm last came in (``time.monotonic()``), whoever read the channel.
        self.heard_at = time.monotonic()
        self.enabled = hasattr(channel, "confirm_select")
        if self.enabled:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)

    def sent(self, outgoing: Outgoing) -> None:
        """Note a message just published on the channel."""
        if not self.enabled:
            return
        self.unconfirmed[self._next] = outgoing
        self._next += 1
        self.sent_since_read += 1

    def _settled(self, tag: int, multiple: bool) -> list[Outgoing]:
        if not multiple:
            single = self.unconfirmed.pop(tag, None)
            return [single] if single is not None else []
        out = []
        # Insertion order is sequence order: settle from the oldest up to ``tag``.
        while self.unconfirmed:
            oldest = next(iter(self.unconfirmed))
            if oldest > tag:
                break
            out.append(self.unconfirmed.pop(oldest))
        return out

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self.heard_at = time.monotonic()
        self._settled(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.heard_at = time.monotonic()
        self.refused += self._settled(tag, multiple)

    def _on_return(self, exc: object, exchange: str, routing_key: str, message: Any) -> None:
        # A return names no sequence number: it is the oldest unconfirmed message with
        # its routing key and body (RabbitMQ returns a message before acknowledging it).
        body = message.body
        raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body)
        for seq, outgoing in self.unconfirmed.items():
            if outgoing.routing_key == routing_key and outgoing.raw == raw:
                self.returned[seq] = self.unconfirmed.pop(seq)
                return

    def move_unconfirmed(self, into: list[Outgoing], cause: BaseException | None = None) -> None:
        """Put everything not confirmed yet (returned too) at the front of ``into``, oldest first.

        Forgotten here only once it is there: interrupted in between (a Ctrl-C), a message
        is in both places, sent twice at worst, never lost. If ``cause``, the error that
        closed the channel, is RabbitMQ refusing a message over its size limit, the
        messages over it are moved to :attr:`refused` instead: sent again, each would close
        the next channel too, with everything after it.
        """
        merged = sorted([*self.returned.items(), *self.unconfirmed.items()])
        limit = size_limit(cause)
        over = [o for _, o in merged if limit is not None and len(o.raw) > limit]
        for outgoing in over:
            log.error(
                "RabbitMQ refused a message of %d bytes to %s: it takes messages of at "
                "most %d bytes (its max_message_size)",
                len(outgoing.raw),
                outgoing.routing_key,
                limit,
            )
        into[:0] = [o for _, o in merged if limit is None or len(o.raw) <= limit]
        self.refused += over
        self.returned.clear()
        self.unconfirmed.clear()
