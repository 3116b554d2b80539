"""One AMQP connection of the AMQP transport, its channel, and the frames it writes.

Publishes and acknowledgements are framed by nbtask (:mod:`.amqp_frames`) on py-amqp's
connections; on others (``memory://``) kombu's own calls write them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from amqp.channel import Channel as AmqpChannel
from amqp.exceptions import RecoverableConnectionError
from kombu.exceptions import OperationalError

from nbtask._process import current_pid
from nbtask.brokers.amqp_confirms import Confirms, Outgoing
from nbtask.brokers.amqp_frames import ack_frame, publish_frames
from nbtask.brokers.amqp_reads import BufferedTCPTransport

__all__ = ["ANSWER_SECONDS", "CLOSE_SECONDS", "Link", "Message"]

#: A message as kombu hands it over (kombu is only partly annotated).
Message = Any
#: How long closing a connection waits for RabbitMQ to confirm it.
CLOSE_SECONDS = 2.0
#: How long a link waits for RabbitMQ to say anything (a confirm, a declare's answer) or
#: take a write, outside a thread's ``answering_within`` block: a server that takes what
#: is sent but says nothing back (stalled, or the network path dead) never holds a caller
#: forever. A wait with a timeout of its own (a fetch's, a read of events) keeps it.
ANSWER_SECONDS = 5.0
_CONTENT = {"content_type": "application/octet-stream", "content_encoding": "binary"}


class Link:
    """One thread's AMQP connection, its channel, and what it consumes."""

    def __init__(self, conn: Any, generation: int) -> None:
        self.conn = conn
        self.pid = current_pid()
        #: The thread whose link this is (made by it, or taking it over once that one
        #: ended): once it ends, the link is closed.
        self.thread = threading.current_thread()
        #: Held while a thread uses the link (:meth:`~.amqp_links.Links.using`): another
        #: reads it only when it can take this (frames read by two threads are lost).
        self.in_use = threading.RLock()
        if (sock := _socket_of(conn.connection)) is not None:  # (None: ``memory://``)
            sock.settimeout(ANSWER_SECONDS)  # its channel's opening waits so long at most
        self.channel: Any = conn.channel()
        self.generation = generation
        self.declared: set[str] = set()
        self.task_queues: tuple[str, ...] = ()
        self.task_consumers: list[Any] = []
        self.inbox: deque[tuple[str, Message]] = deque()  # (nbtask queue, message)
        self.held: dict[str, Message] = {}
        self.reply: str | None = None
        self.reply_consumer: Any = None
        self.replies: deque[Message] = deque()
        self.confirms = Confirms(self.channel)
        self._amqp_channel = isinstance(self.channel, AmqpChannel)
        #: Reads until a whole method is in, ``timeout`` seconds at most: py-amqp's own
        #: on its connections (kombu's wrapper only hands the call on), kombu's on others.
        self.drain_events: Callable[..., Any] = (
            self.channel.connection.drain_events if self._amqp_channel else conn.drain_events
        )
        transport = getattr(self.channel.connection, "transport", None)
        #: The plain TCP transport, which reads ahead and can hold writes (else None).
        self.buffered = transport if isinstance(transport, BufferedTCPTransport) else None
        #: What a failing connection raises (kombu lists them; asked once, not per use).
        self.errors: tuple[type[BaseException], ...] = (
            OSError,
            OperationalError,
            *conn.connection_errors,
            *conn.channel_errors,
        )

    def amqp(self) -> Any:
        """The py-amqp connection, for frames nbtask writes itself (None: ``memory://``)."""
        if self._amqp_channel:
            amqp = self.channel.connection
            if amqp is None:  # py-amqp's own words for a publish on a closed channel
                raise RecoverableConnectionError("basic_publish: connection closed")
            return amqp
        return None

    def drain_ready(self, most_replies: int | None = None) -> None:
        """Take in the frames that arrived, without waiting.

        On plain TCP, those read off the socket already (a read takes all it has): asking
        it again would mostly cost a failed read. Later ones come with the next read.
        ``most_replies``: stop once :attr:`replies` holds that many (a reply queue kept
        full would otherwise be read for ever).
        """
        more = True if most_replies is None else len(self.replies) < most_replies
        with contextlib.suppress(TimeoutError):  # nothing (more) is in
            while more and (self.buffered is None or self.buffered.has_frame()):
                self.drain_events(timeout=0)
                more = most_replies is None or len(self.replies) < most_replies

    @property
    def owing(self) -> bool:
        """Whether messages sent on this link await its sender: unconfirmed, returned, refused."""
        confirms = self.confirms
        return bool(confirms.unconfirmed or confirms.returned or confirms.refused)

    def read_confirms(self, deadline: float) -> BaseException | None:
        """Read the confirms this link owes until all are in or ``deadline`` passes.

        ``deadline`` is a ``time.monotonic()``; the caller holds :attr:`in_use`. Returns
        what the connection raised if it failed (every message still unconfirmed is then
        in doubt), else None.
        """
        try:
            while self.confirms.unconfirmed and (left := deadline - time.monotonic()) > 0:
                self.drain_events(timeout=left)
        except TimeoutError:
            return None  # the time is up; the connection may be fine
        except self.errors as exc:
            return exc
        return None

    def publish(self, outgoing: Outgoing) -> None:
        """Write ``outgoing`` (its confirm is awaited by :class:`~.amqp_links.Links`)."""
        # A task message must reach a queue: RabbitMQ returns it if its queue is gone.
        mandatory = outgoing.task_id is not None
        amqp = self.amqp()
        if amqp is not None:
            frames = publish_frames(
                self.channel.channel_id,
                amqp.frame_max,
                outgoing.routing_key,
                outgoing.raw,
                persistent=outgoing.persistent,
                headers=outgoing.headers,
                mandatory=mandatory,
            )
            amqp.transport.write(frames)
            amqp.bytes_sent += 1
        else:
            message = self.channel.prepare_message(
                outgoing.raw,
                priority=None,
                headers=dict(outgoing.headers),
                properties={"delivery_mode": 2 if outgoing.persistent else 1},
                **_CONTENT,
            )
            self.channel.basic_publish(
                message, exchange="", routing_key=outgoing.routing_key, mandatory=mandatory
            )
        self.confirms.sent(outgoing)

    def ack(self, message: Message) -> None:
        """Acknowledge ``message``, a delivery on this link."""
        amqp, consumer = self.amqp(), message.delivery_info.get("consumer_tag")
        unacked = consumer in (self.channel.no_ack_consumers or ())  # kombu acks no such one
        if amqp is None or message.channel is not self.channel or message.acknowledged or unacked:
            message.ack()  # kombu's own (its refusal of a second ack, its no-op)
            return
        amqp.transport.write(ack_frame(self.channel.channel_id, message.delivery_tag))
        amqp.bytes_sent += 1
        message._state = "ACK"  # as kombu's ack() notes it

    def close(self) -> None:
        """Release the connection (errors ignored: it may be gone already).

        RabbitMQ's confirmation of the close is waited for :data:`CLOSE_SECONDS` at most,
        then the socket is dropped: a broker (or a proxy before it) that takes what is
        sent but answers nothing would otherwise keep a stopping process forever.
        """
        if self.buffered is not None:
            self.buffered.drop_writes()  # what is held is sent again on a new link, if need be
        amqp = self.channel.connection if self._amqp_channel else None
        if amqp is not None and self.wait_at_most(CLOSE_SECONDS):
            with contextlib.suppress(Exception):
                # The connection's close alone: RabbitMQ closes its channels (giving back
                # what they were given and did not acknowledge) before it confirms it.
                # One wait, not one for the channel's close and another for this.
                amqp.close()
        with contextlib.suppress(Exception):
            self.conn.release()  # kombu's own state; nothing more on the wire once closed

    def wait_at_most(self, seconds: float | None) -> bool:
        """Give up a wait for RabbitMQ after ``seconds`` (``None``: as long as it takes).

        A wait given up raises ``TimeoutError``; the link is then in no known state. Only
        py-amqp's connections can be told: False on others (``memory://``) or once closed.
        """
        sock = _socket_of(self.channel.connection if self._amqp_channel else None)
        if sock is None:
            return False
        try:
            sock.settimeout(seconds)
        except OSError:
            return False
        return True


def _socket_of(amqp: Any) -> Any:
    """The socket of a py-amqp connection (None for others, or once closed)."""
    return getattr(getattr(amqp, "transport", None), "sock", None)
