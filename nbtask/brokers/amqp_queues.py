"""Task queues on RabbitMQ: declared durable (once per link), read one by one, deleted."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import kombu as _kombu
from amqp.exceptions import PreconditionFailed, ResourceLocked

from nbtask.brokers.amqp_link import Link, Message
from nbtask.errors import BrokerUnavailable

__all__ = ["CONSUMER_TIMEOUT_MS", "TaskQueues"]

#: ``x-consumer-timeout`` of task queues on RabbitMQ >= 3.12, milliseconds (7 days).
CONSUMER_TIMEOUT_MS = 7 * 24 * 3600 * 1000
# kombu is only partly annotated: used as Any, its objects checked where read.
kombu: Any = _kombu
log = logging.getLogger(__name__)


class TaskQueues:
    """The task queues a transport's links use.

    Parameters
    ----------
    on_refused
        Called with the link whose channel RabbitMQ closed when it refused a declaration
        (the queue exists with other properties).
    """

    def __init__(self, on_refused: Callable[[Link], None]) -> None:
        self._on_refused = on_refused
        self._consumer_timeout: bool | None = None

    def waiting(self, link: Link, name: str, *, ack: bool) -> Iterator[Message]:
        """The messages waiting on task queue ``name``, taken one by one (``basic_get``).

        With ``ack`` each is acknowledged as it is taken; without, it stays unacknowledged
        on ``link`` until settled. Declared again first (see :meth:`declare`).
        """
        self.declare(link, name, again=True)
        waiting = kombu.Queue(name, exchange="", routing_key=name, no_declare=True)
        bound = waiting.bind(link.channel)
        while (message := bound.get(no_ack=ack)) is not None:
            yield message

    def drop_if_idle(self, link: Link, name: str) -> bool:
        """Delete queue ``name`` if it is empty and unconsumed; True if it is gone."""
        # A refusal closes the channel it came on: ask on a spare one.
        spare = link.conn.channel()
        try:
            spare.queue_delete(name, if_unused=True, if_empty=True)
        except link.conn.channel_errors:
            return False
        finally:
            with contextlib.suppress(Exception):
                spare.close()
        link.declared.discard(name)
        return True

    def declare(self, link: Link, name: str, *, again: bool = False) -> None:
        """Declare a durable task queue (once per link, unless ``again``).

        ``again`` for a read of the queue (``basic_get``, ``basic_consume``): RabbitMQ
        answers one on a queue deleted since this link declared it with 404, closing the
        channel. An empty, unconsumed queue is deleted by others: a worker's own
        processes' queues by whoever cleans up after that worker once it looks dead.
        A publish needs no such care (the message comes back, and is sent again).
        """
        if name in link.declared and not again:
            return
        arguments: dict[str, Any] = {}
        if self._supports_consumer_timeout(link):
            arguments["x-consumer-timeout"] = CONSUMER_TIMEOUT_MS
        try:
            link.channel.queue_declare(
                queue=name,
                durable=True,
                exclusive=False,
                auto_delete=False,
                arguments=arguments or None,
            )
        except (PreconditionFailed, ResourceLocked) as exc:
            error = BrokerUnavailable(
                f"cannot use the queue {name!r} on RabbitMQ: someone declared it with other "
                f"properties than nbtask's ({exc.reply_text}). Once nothing on it is needed, "
                f"delete it (rabbitmqctl delete_queue '{name}'); nbtask then declares it anew"
            )
            # Messages RabbitMQ returned for the queue (deleted, then declared by someone
            # else) are refused, their tasks reported unsent: not sent into that queue.
            returned = link.confirms.returned
            for seq in [seq for seq, o in returned.items() if o.routing_key == name]:
                log.error(
                    "%s; task %s, whose message came back, is reported unsent",
                    error,
                    returned[seq].task_id,
                )
                link.confirms.refused.append(returned[seq])
                del returned[seq]
            self._on_refused(link)  # RabbitMQ closed the channel; the connection is fine
            raise error from exc
        link.declared.add(name)

    def _supports_consumer_timeout(self, link: Link) -> bool:
        if self._consumer_timeout is None:
            props = getattr(link.conn.connection, "server_properties", None) or {}
            version = props.get("version", b"")
            text = version.decode() if isinstance(version, bytes) else str(version)
            try:
                major, minor = (int(part) for part in text.split(".")[:2])
            except ValueError:
                major, minor = 0, 0
            self._consumer_timeout = (major, minor) >= (3, 12) and "RabbitMQ" in str(
                props.get("product", b"")
            )
        return self._consumer_timeout
