"""The AMQP links of other threads: taken over once their thread ended, settled at close.

The part of :class:`~nbtask.brokers.amqp_links.Links` that reads what another thread's
link still owes (RabbitMQ's confirms) when that thread is not there to: it ended, or the
transport is closing. What RabbitMQ does not confirm in time is in doubt and noted unsent
(the app revokes those tasks), never waited for without bound.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Callable

from nbtask._process import current_pid
from nbtask._text import redact_url
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_strays import Strays
from nbtask.brokers.base import OWED_SECONDS
from nbtask.errors import BrokerUnavailable

__all__ = ["TAKE_OVER_SECONDS", "OtherThreads", "left_behind"]

#: How long, in all, a thread waits for the confirms of the links it takes over from
#: threads that ended: RabbitMQ may take what is sent and say nothing back.
TAKE_OVER_SECONDS = 5.0


class OtherThreads(abc.ABC):
    """Taking over and settling the links of other threads (see the module's words)."""

    url: str
    _local: threading.local
    _links: list[Link]
    _lock: threading.RLock
    _strays: Strays

    @abc.abstractmethod
    def current(self) -> Link | None:
        """The calling thread's link, if it has one."""

    @abc.abstractmethod
    def answering_within(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """In the block, this thread's waits for RabbitMQ's answers give up after ``seconds``."""

    @abc.abstractmethod
    def publishing(self, send: Callable[[Link], None], *, wait: bool = True) -> None:
        """Run ``send`` on this thread's link; once more on a new link if an old one failed."""

    @abc.abstractmethod
    def _send_orphans(self, link: Link) -> None:
        """Send this thread's orphans on ``link``."""

    @abc.abstractmethod
    def _collect(self, link: Link, window: int) -> None:
        """Take in the confirms that arrived; wait for the rest while over ``window``."""

    @abc.abstractmethod
    def _give_up(self, link: Link, cause: BaseException | None) -> None:
        """Close and unlist ``link``; what it sent unconfirmed is sent again by this thread."""

    def _take_over(self, *, owing: bool = False) -> BrokerUnavailable | None:
        """Take over the links and orphans of threads that ended (and, flushing, stray orphans).

        A thread that sent a task and ended (a thread pool's) would otherwise keep its
        connection open for the life of the transport: one more for every such thread.
        Its link's confirms are read here and the link closed; its messages still
        unconfirmed, and the orphans it left (its link dropped outside a send, by a read
        that failed), are sent again by the calling thread, as a dropped link's are. With
        ``owing`` (a flush), only links and orphans with messages in them are looked at
        (cheaply: the idle links of ended threads wait for the next thread that connects),
        and so are the orphans of a thread still alive that has no link: its next send may
        be far off, after ``app.close()``.

        A link taken over is made the calling thread's and stays listed until given up;
        orphans are copied before they are cleared. Interrupted anywhere (a Ctrl-C), every
        message is still in a list that a take-over or a send looks at: at worst in two,
        sent twice (the start check drops the second task message).

        Their confirms are awaited :data:`TAKE_OVER_SECONDS` in all at most (or this
        thread's :meth:`answering_within` seconds): what RabbitMQ has not confirmed by
        then on a live connection is in doubt (it took the messages but says nothing), so
        it is noted unsent (:meth:`take_unsent`), not sent again. Returns the error saying
        so, if that happened.
        """
        me, pid, current = threading.current_thread(), current_pid(), self.current()
        with self._lock:
            linked = {k.thread for k in self._links if k.pid == pid}
            links = [k for k in self._links if left_behind(k, me, pid, current, owing=owing)]
            for link in links:
                link.thread = me  # claimed: other threads leave it alone
            self._strays.adopt(linked, owing=owing)
        seconds: float = getattr(self._local, "patience", None) or TAKE_OVER_SECONDS
        deadline, silent = time.monotonic() + seconds, None
        for link in links:
            errors: tuple[type[BaseException], ...] = (*link.errors, BrokerUnavailable)
            cause: BaseException | None = None
            with link.in_use:
                try:
                    link.wait_at_most(max(deadline - time.monotonic(), 0.001))
                    self._collect(link, 0)
                except TimeoutError:
                    in_doubt = list(link.confirms.unconfirmed.values())
                    self._strays.note_unsent(in_doubt)
                    link.confirms.unconfirmed.clear()
                    silent = silent or BrokerUnavailable(
                        self._silent(seconds, len(in_doubt), "a thread which ended")
                    )
                except errors as exc:
                    cause = exc
                self._give_up(link, cause)
        return silent

    def _silent(self, seconds: float, in_doubt: int, sender: str) -> str:
        """What to say when RabbitMQ did not answer ``sender``'s link within ``seconds``."""
        said = f"RabbitMQ at {redact_url(self.url)} did not answer within {seconds:g} s"
        if not in_doubt:
            return f"{said}. Is it stalled (a memory or disk alarm?), or the network path cut?"
        return (
            f"{said}: it did not confirm {in_doubt} message(s) that {sender} had sent, so "
            "they may or may not have reached it. The tasks among them are revoked (they "
            "will not run, even if their messages did get through): send them again"
        )

    def settle_every_thread(self) -> None:
        """Settle what every thread of this process owes, :data:`OWED_SECONDS` at most in all.

        For closing. The links of other threads that owe confirms (a live thread's, which
        sent without waiting and did not flush), or whose thread has orphans, are read
        once their thread is done with them, and closed: that thread connects anew if it
        sends again. What such a link left unconfirmed because its connection dropped,
        what RabbitMQ returned, and every thread's orphans, are sent again by this thread,
        whose own confirms are awaited too. Task messages not confirmed by then, or
        refused, are noted for :meth:`take_unsent` (the app revokes those tasks). Never
        raises :class:`BrokerUnavailable`.
        """
        deadline = time.monotonic() + OWED_SECONDS
        pid, current, astray = current_pid(), self.current(), self._strays.astray()
        with self._lock:
            links = [
                k
                for k in self._links
                if k.pid == pid and k is not current and (k.owing or k.thread in astray)
            ]
        for link in links:
            self._settle_link(link, deadline)
        with self._lock:
            self._strays.adopt({k.thread for k in self._links if k.pid == pid}, owing=True)
        if self.current() is None and not self._strays.mine():
            return
        # A link kept sends the orphans taken over on it (a new one sends them first anyway).
        left = max(deadline - time.monotonic(), 0.001)
        with contextlib.suppress(BrokerUnavailable), self.answering_within(left):
            self.publishing(self._send_orphans)

    def _settle_link(self, link: Link, deadline: float) -> None:
        """Read what another thread's ``link`` owes until ``deadline``, then give it up.

        Its thread may be using it right now: it is read only once that thread is done
        with it, waited for within the same time. If it is not done by then, what the
        link owes is in doubt, and noted unsent; the link is closed under it (by
        :meth:`close`), as at any close: its use fails.
        """
        confirms = link.confirms
        if not link.in_use.acquire(timeout=max(0.0, deadline - time.monotonic())):
            # Copied whole while its thread may change them (no Python code runs meanwhile).
            owed = [*list(confirms.unconfirmed.values()), *list(confirms.returned.values())]
            self._strays.note_unsent([*owed, *confirms.refused])
            return
        try:
            cause = link.read_confirms(deadline)
            if cause is None:
                # Not answered in time on a live connection: in doubt, not sent again.
                self._strays.note_unsent(list(confirms.unconfirmed.values()))
                confirms.unconfirmed.clear()
            # What RabbitMQ returned (and, the connection gone, all it owed) goes to this
            # thread's orphans, sent again on its link.
            self._give_up(link, cause)
        finally:
            link.in_use.release()


def left_behind(
    link: Link, me: threading.Thread, pid: int, current: Link | None, *, owing: bool
) -> bool:
    """Whether thread ``me``'s take-over takes ``link`` over (``owing``: a flush's).

    That is, a link of this process (``pid``) other than ``me``'s ``current`` one: ``me``'s
    own (one a Ctrl-C left behind), or that of a thread that ended, for a flush only if
    it has messages in it. Both a take-over and a flush's return with nothing to do
    (:meth:`~nbtask.brokers.amqp_links.Links.flush`) ask this, so what the one skips is
    what the other would leave. Takes no lock, and asks a thread whether it ended only
    after what its link owes (cheaper): a flush with nothing owed never asks.
    """
    if link.pid != pid or link is current:
        return False
    if link.thread is me:
        return True
    if owing and not (link.confirms.unconfirmed or link.confirms.returned):
        return False
    return not link.thread.is_alive()
