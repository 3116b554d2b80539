"""What the AMQP transport sent that no connection carries now: orphans, unsent tasks.

A message sent on a link whose connection dropped before RabbitMQ confirmed it is an
*orphan* of the thread that sent it: that thread's next link sends it first. Each
thread's orphans are listed here (by process and thread) so that another thread can take
over those of a thread that ended, or that has no link, and so that closing sends them
all rather than forget them. A task whose message could not be sent again, or that
RabbitMQ refused, is noted *unsent*, for the app to revoke (see
:meth:`~nbtask.brokers.amqp_links.Links.take_unsent`).
"""

from __future__ import annotations

import threading

from nbtask._process import current_pid
from nbtask.brokers.amqp_confirms import Outgoing

__all__ = ["Strays"]


class Strays:
    """Every thread's orphans, and the ids of tasks noted unsent, of one transport.

    Parameters
    ----------
    lock
        The links' lock (reentrant). A take-over looks at which threads have a link and
        takes the orphans of those without one in one step under it, while a thread
        lists its new link under it before sending its orphans.
    """

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._local = threading.local()
        self._unsent: list[str] = []
        self._lists: list[tuple[int, threading.Thread, list[Outgoing]]] = []

    def mine(self) -> list[Outgoing]:
        """The calling thread's orphans (a list the caller changes in place)."""
        orphans: list[Outgoing] | None = getattr(self._local, "orphans", None)
        if orphans is None:
            orphans = self._local.orphans = []
            with self._lock:
                self._lists.append((current_pid(), threading.current_thread(), orphans))
        return orphans

    def any_orphans(self) -> bool:
        """Whether any thread of this process has orphans (read without the lock)."""
        pid = current_pid()
        return any(orphans for p, _, orphans in list(self._lists) if p == pid)

    def astray(self) -> set[threading.Thread]:
        """The threads of this process that have orphans."""
        pid = current_pid()
        with self._lock:
            return {thread for p, thread, orphans in self._lists if p == pid and orphans}

    def adopt(self, linked: set[threading.Thread], *, owing: bool) -> None:
        """Take the orphans of ended threads (``owing``: of live ones without a link too).

        Called under the lock, ``linked`` holding the threads of this process that have
        a link listed: such a thread's next link sends its orphans first.
        """
        me, pid, mine = threading.current_thread(), current_pid(), self.mine()
        for entry in list(self._lists):
            entry_pid, thread, orphans = entry
            if entry_pid != pid or thread is me:
                continue
            alive = thread.is_alive()
            if alive and (not owing or thread in linked):
                continue  # its own next link sends them first (a flush: if it has none)
            if orphans:
                mine.extend(orphans)
                orphans.clear()
            if not alive:
                self._lists.remove(entry)

    def forget_all(self) -> None:
        """Closing: note every orphan left in this process unsent, and forget the lists."""
        pid = current_pid()
        with self._lock:
            left = [o for p, _, orphans in self._lists if p == pid for o in orphans]
            self._lists = []
            self._local = threading.local()
        self.note_unsent(left)

    def note_unsent(self, messages: list[Outgoing]) -> None:
        """Note the tasks of ``messages`` (events have none) for :meth:`take_unsent`."""
        ids = [m.task_id for m in messages if m.task_id]
        if ids:
            with self._lock:
                self._unsent += ids

    def take_unsent(self) -> list[str]:
        """Ids of tasks noted unsent since the last call; each once."""
        with self._lock:
            out, self._unsent = self._unsent, []
        return out
