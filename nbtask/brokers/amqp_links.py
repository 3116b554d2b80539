"""AMQP connections of the AMQP transport: one per thread, and what each consumes."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kombu as _kombu
from amqp.exceptions import ChannelError, ConsumerCancelled

from nbtask._process import current_pid
from nbtask._text import redact_url
from nbtask.brokers.amqp_confirms import Outgoing, size_limit
from nbtask.brokers.amqp_guards import GUARDED
from nbtask.brokers.amqp_link import ANSWER_SECONDS, Link
from nbtask.brokers.amqp_others import OtherThreads, left_behind
from nbtask.brokers.amqp_queues import TaskQueues
from nbtask.brokers.amqp_strays import Strays
from nbtask.brokers.base import PIPELINE_WINDOW
from nbtask.brokers.forks import close_copies_in_forks
from nbtask.errors import BrokerUnavailable

__all__ = [
    "COLLECT_EVERY",
    "MAX_RETURNS",
    "QUIET_SECONDS",
    "Links",
]

#: A publish that does not wait reads the confirms already in once every this many
#: publishes of its link: reading when none is in costs a failed non-blocking read, and
#: whatever else reads the connection (a worker's next fetch) takes them in meanwhile.
COLLECT_EVERY = 64
#: ... and at once if no confirm came in for this long: the link may have been idle, and
#: a write to a connection the server closed meanwhile succeeds; only a read finds out
#: (then the publish is made again on a new link, as for any link gone stale).
QUIET_SECONDS = 0.05
#: Times a task message returned by RabbitMQ (its queue deleted) is sent again.
MAX_RETURNS = 3
# kombu is only partly annotated: used as Any, its objects checked where read.
kombu: Any = _kombu
log = logging.getLogger(__name__)


class Links(OtherThreads):
    """The AMQP connections of one transport, one per thread (a thread's own is reused).

    Parameters
    ----------
    url
        The kombu URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._generations = itertools.count(1)
        self._links: list[Link] = []
        # Reentrant: noting unsent messages (which takes it) is done under it too.
        self._lock = threading.RLock()
        #: Task queues: declared once per link, read, deleted.
        self.queues = TaskQueues(self._refused_queue)
        self._calls = itertools.count(1)
        #: Every thread's orphans, and tasks noted unsent: those of a thread that ended,
        #: or that has no link listed (:meth:`_take_over`), are taken over by another.
        self._strays = Strays(self._lock)
        close_copies_in_forks(self, Links._sockets)

    def _sockets(self) -> list[Any]:
        """The socket of every listed link (read without the lock: for forks)."""
        transports = [getattr(link.channel.connection, "transport", None) for link in self._links]
        return [getattr(transport, "sock", None) for transport in transports]

    def current(self) -> Link | None:
        """The calling thread's link, if it has one."""
        link: Link | None = getattr(self._local, "link", None)
        if link is not None and link.pid != current_pid():
            return None  # a process forked meanwhile never uses its parent's connection
        return link

    def get(self) -> Link:
        """The calling thread's link, connecting it first if needed."""
        link = self.current()
        if link is not None:
            return link
        # (What RabbitMQ did not confirm in time there is noted unsent: the app's next
        # flush or close revokes those tasks. This thread connects all the same.)
        self._take_over()
        conn = kombu.Connection(
            self.url,
            transport=GUARDED.get(self.url.split("://", 1)[0].lower()),
            connect_timeout=5,
            heartbeat=0,  # a child runs user code and cannot answer AMQP heartbeats
        )
        try:
            conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            conn.release()
            raise self.unavailable(exc) from exc
        try:
            link = Link(conn, next(self._generations))
        except Exception as exc:  # the connection dropped while its channel opened
            conn.release()
            raise self.unavailable(exc) from exc
        # Listed before it carries anything: if this is interrupted (a Ctrl-C), the link
        # is found by this thread's next take-over, with the orphans it was sending.
        with self._lock:
            self._links.append(link)
        try:
            # What the thread's previous link left unconfirmed goes first, whatever
            # this link is for (a worker child's next fetch sends its last events).
            with link.in_use:
                self._send_orphans(link)
        except Exception as exc:
            self._give_up(link, exc)
            raise self.unavailable(exc) from exc
        self._local.link = link
        return link

    def drop(self, cause: BaseException | None = None) -> None:
        """Close this thread's link (``cause``: why it failed); the next use connects anew."""
        link = self.current()
        self._local.link = None
        if link is not None:
            self._give_up(link, cause)

    def _give_up(self, link: Link, cause: BaseException | None) -> None:
        """Close and unlist ``link``; what it sent unconfirmed is sent again by this thread.

        Unlisted last: if this is interrupted, the link is still listed (this thread's
        own, not its current one) and its next take-over gives it up again.
        """
        link.confirms.move_unconfirmed(self._strays.mine(), cause)
        self._strays.note_unsent(link.confirms.refused)
        link.confirms.refused = []
        link.close()
        with self._lock, contextlib.suppress(ValueError):
            self._links.remove(link)

    def close(self) -> None:
        """Close every thread's link, first settling what they owe (:meth:`settle_every_thread`).

        Task messages that RabbitMQ did not confirm by then (or refused), not taken by
        :meth:`take_unsent` (an app revokes them), may never have reached it: they are
        named in one error.
        """
        self.settle_every_thread()
        with self._lock:
            links, self._links = self._links, []
        # Those of a thread whose link was still in use after the wait, if any.
        self._strays.forget_all()
        for link in links:
            link.close()
        self._local = threading.local()
        if ids := self.take_unsent():
            log.error(
                "RabbitMQ did not confirm the messages of task(s) %s before the connections "
                "closed: they may or may not have reached it, so the tasks may or may not "
                "run (their records stay PENDING). Follow each with app.handle(task_id) "
                "before sending it again",
                ", ".join(ids),
            )

    def unavailable(self, exc: BaseException) -> BrokerUnavailable:
        """The one error for a broker that cannot be reached (or refused a message's size)."""
        if (limit := size_limit(exc)) is not None:
            return BrokerUnavailable(
                f"RabbitMQ at {redact_url(self.url)} refused a message over its max_message_size "
                f"({limit} bytes): {exc}. Pass large data by reference, or keep "
                "NBTASK_BLOB_THRESHOLD below that size"
            )
        code = getattr(exc, "code", None)
        if isinstance(exc, ChannelError) and code == 404:
            return BrokerUnavailable(_not_found(redact_url(self.url), exc))
        # RabbitMQ answered, and refused: 403 ACCESS_REFUSED (login), 530 NOT_ALLOWED (vhost).
        refused = code in (403, 530)
        hint = (
            "Check the user name, password and vhost in the URL"
            if refused
            else "Is RabbitMQ running there? (start it with: rabbitmq-server -detached)"
        )
        return BrokerUnavailable(
            f"cannot reach the AMQP broker at {redact_url(self.url)}: {str(exc).rstrip('.')}. "
            + hint
        )

    @contextlib.contextmanager
    def answering_within(self, seconds: float) -> Iterator[None]:
        """In the block, this thread's waits for RabbitMQ's answers give up after ``seconds``.

        One given up drops the link and raises :class:`BrokerUnavailable` (a wait with a
        timeout of its own, a fetch's, still ends as that one says). In a block inside
        another, the outer one's patience holds again after it.
        """
        outer: float | None = getattr(self._local, "patience", None)
        self._local.patience = seconds
        try:
            yield
        finally:
            self._local.patience = outer
            link = self.current()
            if link is not None:
                link.wait_at_most(ANSWER_SECONDS if outer is None else outer)

    @contextlib.contextmanager
    def using(self) -> Iterator[Link]:
        """Yield this thread's link; connection errors become :class:`BrokerUnavailable`.

        A wait for RabbitMQ's answer (or to take a write) gives up after this thread's
        :meth:`answering_within` seconds, else :data:`ANSWER_SECONDS`: the link is
        dropped, and the messages it sent that RabbitMQ did not confirm are in doubt
        (it may have them), so noted unsent (:meth:`take_unsent`), not sent again. A
        wait with a timeout of its own (a fetch's) catches its ``TimeoutError`` inside.
        """
        link = self.get()
        patience: float | None = getattr(self._local, "patience", None)
        if patience is not None:
            link.wait_at_most(patience)
        try:
            with link.in_use:
                yield link
        except link.errors as exc:
            if isinstance(exc, TimeoutError):
                in_doubt = list(link.confirms.unconfirmed.values())
                self._strays.note_unsent(in_doubt)
                link.confirms.unconfirmed.clear()
                self.drop(exc)
                seconds = ANSWER_SECONDS if patience is None else patience
                raise BrokerUnavailable(
                    self._silent(seconds, len(in_doubt), "this thread")
                ) from exc
            if isinstance(exc, BrokerUnavailable):
                raise  # the result store's or a queue's: it says why
            self.drop(exc)
            if isinstance(exc, ConsumerCancelled):
                raise BrokerUnavailable(
                    "RabbitMQ cancelled a consumer of this connection (its queue was "
                    "deleted?); the next connection declares the queue and consumes it again"
                ) from exc
            raise self.unavailable(exc) from exc

    @contextlib.contextmanager
    def writes_together(self) -> Iterator[None]:
        """Frames this thread's link writes inside leave together, in one write at the end.

        A read that may wait writes them first. If the final write fails, the link is
        dropped and what it sent unconfirmed sent again at once on a new link (:meth:`flush`,
        raising if that fails too); an acknowledgement is lost with the connection.
        """
        link = self.current()
        held = link.buffered if link is not None else None
        if held is None or held.holding:
            yield
            return
        held.hold_writes()
        try:
            yield
        finally:
            if self.current() is not link:
                held.drop_writes()  # dropped meanwhile: its messages are orphans now
            else:
                try:
                    with self.using():
                        held.release_writes()
                except BrokerUnavailable as exc:
                    log.warning(
                        "%s; sending what it left unconfirmed again on a new connection. "
                        "A message it acknowledged is redelivered, and the copy dropped "
                        "as settled",
                        exc,
                    )
                    self.flush()

    def publishing(self, send: Callable[[Link], None], *, wait: bool = True) -> None:
        """Run ``send`` on this thread's link; once more on a new link if an old one failed.

        With ``wait``, return once RabbitMQ confirmed everything this thread sent (the
        batch's confirms awaited together); without, once it is written, collecting the
        confirms already in every :data:`COLLECT_EVERY` publishes or after a quiet spell
        (up to :data:`PIPELINE_WINDOW` may be outstanding).

        A link that went stale while idle (its connection dropped, RabbitMQ restarted)
        fails only when used; a fresh link failing is a real outage. Messages that a
        dropped link sent unconfirmed are sent again first, on the new link (:meth:`get`).
        At worst a message that reached RabbitMQ just before its connection died is sent
        twice: the start check drops the second task message, a handle ignores a
        repeated event. If this call fails, its own messages are not sent again later;
        earlier ones that could not be sent either are noted (:meth:`take_unsent`).
        """
        call = next(self._calls)
        self._local.call = call
        try:
            for attempt in (1, 2):
                fresh = self.current() is None
                try:
                    with self.using() as link:  # a new link sends orphans first
                        send(link)
                        self._collect(link, 0 if wait else PIPELINE_WINDOW)
                    return
                except BrokerUnavailable as exc:
                    # A RabbitMQ that took the messages and said nothing would say nothing
                    # to a new link either: not tried again (what it owes is noted unsent).
                    last = fresh or attempt == 2 or isinstance(exc.__cause__, TimeoutError)
                    orphans = self._strays.mine()
                    # Locked: with no link, this thread's orphans are others' to take over.
                    with self._lock:
                        # ``send`` runs whole again: its messages are not orphans.
                        orphans[:] = [o for o in orphans if o.call != call]
                        if last:
                            self._strays.note_unsent(orphans)
                            orphans.clear()
                    if last:
                        raise
        finally:
            self._local.call = 0

    def flush(self) -> None:
        """Wait for the confirms of everything this thread sent (sending orphans again).

        What threads that ended left unconfirmed, and the orphans of threads without a
        link, are taken over first (:meth:`_take_over`). Raises :class:`BrokerUnavailable`
        if RabbitMQ did not confirm in time what such a thread sent (those tasks are then
        in :meth:`take_unsent`).
        """
        if self._nothing_owed():
            return  # (a get() flushes first: most often there is nothing to wait for)
        silent = self._take_over(owing=True)
        if self.current() is not None or self._strays.mine():
            # A link kept sends the orphans taken over on it (a new one sends them first).
            self.publishing(self._send_orphans)
        if silent is not None:
            raise silent

    def _nothing_owed(self) -> bool:
        """Whether a flush has nothing to do.

        That is, this thread's link owes nothing (messages unconfirmed, returned or
        refused), its take-over would take no link over (the same test as
        :meth:`_take_over`'s), and no thread has orphans. Read without the lock: a link or
        orphan added meanwhile belongs to a send that returned after this flush began.
        """
        me, pid, current = threading.current_thread(), current_pid(), self.current()
        if current is not None and current.owing:
            return False
        for link in list(self._links):
            if left_behind(link, me, pid, current, owing=True):
                return False
        return not self._strays.any_orphans()

    def take_unsent(self) -> list[str]:
        """Ids of tasks whose messages RabbitMQ refused or that could not be sent again."""
        return self._strays.take_unsent()

    def _send_orphans(self, link: Link) -> None:
        orphans = self._strays.mine()
        while orphans:
            link.publish(orphans[0])
            orphans.pop(0)

    def _collect(self, link: Link, window: int) -> None:
        """Take in the confirms that arrived; wait for the rest while over ``window``.

        With a ``window``, the confirms already in are read only once every
        :data:`COLLECT_EVERY` publishes, or after :data:`QUIET_SECONDS` without a
        confirm. Task messages RabbitMQ returned (their queue was
        deleted) are sent again to the queue declared anew, up to :data:`MAX_RETURNS`
        times each; then refused.
        """
        confirms = link.confirms
        while True:
            if not window:
                # All are waited for just below: a read that does not wait first would
                # take nothing the waiting one does not (and mostly fail: none is in yet).
                confirms.sent_since_read = 0
            elif (
                confirms.sent_since_read >= COLLECT_EVERY
                or time.monotonic() - confirms.heard_at >= QUIET_SECONDS
            ):
                confirms.sent_since_read = 0
                with contextlib.suppress(TimeoutError):
                    while confirms.unconfirmed:
                        link.drain_events(timeout=0)
            while len(confirms.unconfirmed) > window:
                link.drain_events(timeout=None)
            if not confirms.returned:
                break
            self._send_returned(link)
        if confirms.refused:
            self._strays.note_unsent(confirms.refused)
            confirms.refused = []

    def _send_returned(self, link: Link) -> None:
        returned = link.confirms.returned
        # Declared before the messages are taken: if that fails, the link's messages are
        # sent again on the next link or reported unsent; those for a queue someone else
        # declared meanwhile are refused (:meth:`TaskQueues.declare`).
        again = [o for o in returned.values() if o.returns < MAX_RETURNS]
        for name in dict.fromkeys(o.routing_key for o in again):
            log.warning(
                "queue %s was gone when a message reached it (deleted after it was "
                "declared); declaring it again and sending its messages again",
                name,
            )
            link.declared.discard(name)
            self.queues.declare(link, name)
        while returned:
            # Forgotten once sent again: interrupted, it is sent twice at worst.
            seq, outgoing = next(iter(returned.items()))
            if outgoing.returns >= MAX_RETURNS:
                link.confirms.refused.append(outgoing)
            else:
                link.publish(dataclasses.replace(outgoing, returns=outgoing.returns + 1))
            del returned[seq]

    def _refused_queue(self, link: Link) -> None:
        # RabbitMQ closed the channel; the connection is fine. A link taken over from a
        # thread that ended is given up by the take-over, not this thread's own.
        if link is self.current():
            self.drop()

    def send(
        self,
        link: Link,
        routing_key: str,
        raw: bytes,
        *,
        persistent: bool,
        headers: Mapping[str, Any] | None = None,
        task_id: str | None = None,
    ) -> None:
        """Publish ``raw`` on the default exchange, kept until RabbitMQ confirms it."""
        call = getattr(self._local, "call", 0)
        outgoing = Outgoing(routing_key, raw, persistent, dict(headers or {}), task_id, call)
        link.publish(outgoing)


def _not_found(url: str, exc: ChannelError) -> str:
    """What a 404 NOT_FOUND means: RabbitMQ runs, but what was used is not there.

    Most often a queue deleted while in use: by nbtask's clean-up after a worker taken for
    dead, an operator (``rabbitmqctl delete_queue``), a policy, or another program.
    """
    said = str(exc).rstrip(".")
    queue = re.search(r"no queue '([^']*)'", getattr(exc, "reply_text", "") or said)
    if queue is None:
        return f"RabbitMQ at {url} runs, but has no such object ({said})"
    return (
        f"RabbitMQ at {url} runs, but has no queue {queue.group(1)!r} ({said}): it was "
        "deleted while in use (by nbtask's clean-up after a worker that looked dead, "
        "'rabbitmqctl delete_queue', a policy, or another program). A new connection "
        "declares it again at its next use; if this keeps happening, find what deletes it"
    )
