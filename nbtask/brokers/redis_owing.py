"""The replies a link owes: task publishes sent without waiting, read later.

The part of :class:`~nbtask.brokers.redis_link.RedisLink` that sends a lone publish
without reading Redis's reply, reads those replies later (by the thread's next command,
:meth:`~OwedReplies.settle_owed`, or when the link closes), and sends again what Redis
never got. What one thread owes is an :class:`~nbtask.brokers.redis_owed.Owed`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask._process import current_pid
from nbtask.brokers.base import PIPELINE_WINDOW
from nbtask.brokers.redis_errors import Unanswered, sent_unanswered, sentence
from nbtask.brokers.redis_owed import OWED_BYTES, Owed
from nbtask.brokers.redis_resp import (
    Command,
    closed_by_server,
    pack_one,
    read_reply,
    send_first,
)

__all__ = ["OwedReplies"]

log = logging.getLogger("nbtask.brokers.redis_link")

_UNGUARDED = contextlib.nullcontext()


class OwedReplies(abc.ABC):
    """Publishes sent without waiting, per thread, and what becomes of their replies."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._owing: dict[int, Owed] = {}  # by id(): every thread's replies not read yet
        self._unsent: list[str] = []
        self._lock = threading.Lock()

    @abc.abstractmethod
    def run(
        self,
        commands: Sequence[Command],
        *,
        block_seconds: float = 0.0,
        raise_errors: bool = True,
        large: bool = False,
        idempotent: bool = False,
    ) -> list[Any]:
        """Send ``commands`` in one write and read every reply."""

    @abc.abstractmethod
    def run_scripts(self, commands: Sequence[Command], *, large: bool = False) -> list[Any]:
        """Run commands (scripts among them), loading the scripts if the server lost them."""

    @abc.abstractmethod
    def load_scripts(self) -> None:
        """Load every script, in one round trip."""

    @abc.abstractmethod
    def _connection(self) -> Any:
        """The connection of this thread (made on first use)."""

    @abc.abstractmethod
    def _gave_up(self, exc: BaseException) -> bool:
        """Whether this thread gives up on Redis for ``exc``."""

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        """Held while this thread uses its connection: a closing link then leaves it be."""
        owed: Owed | None = getattr(self._local, "owed", None)
        if owed is None or owed.pid != current_pid():  # (a fork's copy may be held for ever)
            return _UNGUARDED
        return owed.using

    @property
    def read_lost(self) -> bool:
        """A connection of this thread failed since the flag was last cleared.

        A blocking read served meanwhile may have delivered an entry whose reply never
        arrived; the Streams transport looks for it before reading anew.
        """
        return bool(getattr(self._local, "read_lost", False))

    @read_lost.setter
    def read_lost(self, value: bool) -> None:
        self._local.read_lost = value

    def send_unanswered(
        self, command: Command, task_id: str, *, again: Command | None = None
    ) -> None:
        """Send task ``task_id``'s publish script without waiting for Redis's reply.

        The reply is read by this thread's next command, by :meth:`settle_owed` or by
        :meth:`close`; a thread owing :data:`PIPELINE_WINDOW` replies, or
        :data:`OWED_BYTES` of commands (kept to be sent again), reads them first. A
        publish Redis did not run (the connection dropped before its reply came and it
        cannot be sent again, or Redis answered with an error) is noted for
        :meth:`take_unsent`. Sending one again is safe: the script refuses a task id that
        already has a record, so a copy that did get through is never queued twice.
        ``again`` is the command sent again instead, when ``command`` does not look (see
        :func:`~nbtask.brokers.redis_owed.looking`).

        One whose reply Redis does not send in time (it is stalled, or the way back is
        cut) is not sent again: Redis may run the copy it has when it wakes. The command
        that waited raises :class:`~nbtask.brokers.redis_errors.Unanswered`, naming it.
        """
        owed = self._owed()
        with owed.using:
            self._send_unanswered(owed, command, task_id, command if again is None else again)

    def _send_unanswered(self, owed: Owed, command: Command, task_id: str, again: Command) -> None:
        if len(owed.sent) >= PIPELINE_WINDOW or owed.size >= OWED_BYTES:
            self.settle_owed()
        if owed.connection._sock is None:
            # Not connected yet: send this one as a call, which connects or raises at once.
            self.run_scripts([command])
            return
        packed = pack_one(command)  # first: a command that cannot be packed is not owed
        try:
            # Owed before it is written: a Ctrl-C right after the write must not leave
            # its reply unaccounted for, to be read as the answer to another command.
            self._owe(owed, [(again, task_id)], len(packed))
            # Looked at once the command is on its way (looking lets go of the GIL): a
            # server gone since the last reply (stopped, restarted) never read it.
            sent = send_first(owed.connection, [packed])
            gone = not sent or closed_by_server(owed.connection)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            owed.connection.disconnect()
            self._gave_up(exc)
            self.read_lost = True
            taken = self._take_owed(owed)
            if sent_unanswered(exc):
                # Redis stopped taking what is written: it may run what it has when it
                # wakes, and a copy sent again would wait as long for nothing.
                raise self._unconfirmed(taken, exc) from exc
            # Whether Redis got this one, or the ones owed before it, is unknown: send
            # them all again now, on a new connection, and raise if that fails too.
            self._send_again(taken)
            return
        except BaseException:
            # Interrupted: what was written is unknown, so the connection goes, and with
            # it the replies owed on it; reading them fails, and they are sent again.
            owed.connection.disconnect()
            raise
        if gone:
            # Sent as a call instead, which reads what is owed before it (sending that
            # again), then reconnects or raises at once.
            self._forget_last(owed)
            self.run_scripts([again])

    @property
    def owed(self) -> int:
        """How many replies to :meth:`send_unanswered` this thread has not read yet."""
        owed = getattr(self._local, "owed", None)
        return len(owed.sent) if owed is not None and owed.pid == current_pid() else 0

    def settle_owed(self) -> None:
        """Read the replies this thread owes (see :meth:`send_unanswered`).

        Raises redis-py's ``ConnectionError`` when some must be sent again and Redis
        cannot be reached: they are then noted for :meth:`take_unsent`. Raises
        :class:`~nbtask.brokers.redis_errors.Unanswered` when Redis took some but did
        not answer in time: they may run, and are forgotten (neither sent nor noted).
        """
        owed = getattr(self._local, "owed", None)
        if owed is not None and owed.sent and owed.pid == current_pid():
            with owed.using:
                self._settle(owed)

    def settle_ended(self) -> None:
        """Read the replies threads that ended still owe (sending again what needs it).

        Nobody else would before :meth:`close`: a publish whose connection dropped before
        Redis read it would wait unsent until then, its task never run nor reported.
        Raises redis-py's ``ConnectionError`` as :meth:`settle_owed` does, and
        :class:`~nbtask.brokers.redis_errors.Unanswered` naming every task Redis took but
        did not answer for (each thread's are read all the same).
        """
        if not self._owing:  # (read unlocked: only a live thread adds to it)
            return
        pid, mine = current_pid(), getattr(self._local, "owed", None)
        with self._lock:  # taken out while read: two threads never read one connection
            ended = [
                o
                for o in self._owing.values()
                if o is not mine and o.pid == pid and not o.thread.is_alive()
            ]
            for owed in ended:
                del self._owing[id(owed)]
        failed: Exception | None = None
        unanswered: list[Unanswered] = []
        for owed in ended:
            try:
                with owed.using:  # (a closing link may be reading them)
                    self._settle(owed)
            except Unanswered as exc:  # taken out of the list: named here, or never
                unanswered.append(exc)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                failed = failed or exc  # the others are settled all the same
            finally:
                if not owed.sent:  # (an interrupted read left some owed, kept again)
                    owed.connection.disconnect()
        if unanswered:  # (those that failed otherwise are noted unsent already)
            ids = tuple(task_id for exc in unanswered for task_id in exc.task_ids)
            raise Unanswered(str(unanswered[0]), ids)
        if failed is not None:
            raise failed

    def in_doubt(self) -> set[str]:
        """Ids of tasks sent by :meth:`send_unanswered` whose fate is not known yet.

        Every thread's publishes whose replies are not read yet (each is sent again by its
        thread's next command if Redis lost it), and those noted for :meth:`take_unsent`
        and not taken yet: a task among them may have no record now and still be queued
        (or revoked) soon.
        """
        pid = current_pid()
        with self._lock:
            owing = [owed for owed in self._owing.values() if owed.pid == pid]
            found = {task_id for owed in owing for _, task_id in owed.sent}
            return found | set(self._unsent)

    def take_unsent(self) -> list[str]:
        """Ids of tasks sent by :meth:`send_unanswered` that Redis never queued; each once."""
        if not self._unsent:  # (read unlocked, as after every send: one noted later is taken next)
            return []
        with self._lock:
            out, self._unsent = self._unsent, []
        return out

    def _owed(self) -> Owed:
        connection = self._connection()
        owed: Owed | None = getattr(self._local, "owed", None)
        if owed is None or owed.connection is not connection:
            owed = self._local.owed = Owed(connection, current_pid())
        return owed

    def _owe(self, owed: Owed, entries: list[tuple[Command, str]], size: int) -> None:
        with self._lock:
            self._owing[id(owed)] = owed
            owed.sent += entries
            owed.size += size

    def _take_owed(self, owed: Owed) -> list[tuple[Command, str]]:
        with self._lock:
            self._owing.pop(id(owed), None)
        sent, owed.sent, owed.size = owed.sent, [], 0
        return sent

    def _forget_last(self, owed: Owed) -> None:
        with self._lock:
            owed.sent.pop()
            if not owed.sent:
                owed.size = 0
                self._owing.pop(id(owed), None)

    def _forget_owed(self, owed: Owed, settled: int) -> None:
        with self._lock:
            del owed.sent[:settled]
            if not owed.sent:  # (the size of a part is not kept: it counts till then)
                owed.size = 0
                self._owing.pop(id(owed), None)

    def _settle(self, owed: Owed, *, closing: bool = False) -> None:
        # A publish leaves ``owed`` only once its reply is read, or it is handed on to be
        # sent again or reported, so an interruption (Ctrl-C) anywhere here loses none.
        # ``closing``: one Redis took but did not answer for is noted unsent, not raised.
        settled = 0
        again: list[tuple[Command, str]] = []
        unanswered: list[tuple[Command, str]] = []
        try:
            for entry in owed.sent:
                try:
                    read_reply(owed.connection)
                except NoScriptError:  # the server restarted empty: nothing ran
                    again.append(entry)
                except ResponseError as exc:
                    self._note_unsent([entry], exc)
                settled += 1
        except (RedisConnectionError, RedisTimeoutError) as exc:
            owed.connection.disconnect()
            self._gave_up(exc)
            self.read_lost = True
            if sent_unanswered(exc):
                # Redis has them, or may have: it runs them when it answers again.
                unanswered, silence = owed.sent[settled:], exc
            else:
                again += owed.sent[settled:]
            settled = len(owed.sent)
        except BaseException:
            # Interrupted mid-read: the connection cannot be reused, and the replies
            # not read yet are owed still (reading them then fails: sent again).
            owed.connection.disconnect()
            self._owe(owed, again, 0)
            raise
        finally:
            self._forget_owed(owed, settled)
        if unanswered:
            if again:  # refused as NOSCRIPT (never ran), but Redis answers no more now
                self._note_unsent(again, silence)
            if closing:  # revoked by the app: in doubt, they must not run unseen
                self._note_unsent(unanswered, silence, quiet=True)
                return
            raise self._unconfirmed(unanswered, silence)
        self._send_again(again)

    def _send_again(self, entries: Sequence[tuple[Command, str]]) -> None:
        if not entries:
            return
        try:
            self.load_scripts()  # (first: a timeout here is not the publishes')
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._note_unsent(entries, exc)
            raise
        except BaseException:
            self._owe_again(entries)
            raise
        try:
            # (Sent once more if this connection drops too: a copy that got through is
            # refused by its task's record, as these are.)
            commands = [command for command, _ in entries]
            replies = self.run(commands, raise_errors=False, idempotent=True)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if sent_unanswered(exc):
                raise self._unconfirmed(entries, exc) from exc
            self._note_unsent(entries, exc)
            raise
        except BaseException:
            self._owe_again(entries)
            raise
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, ResponseError):
                self._note_unsent([entry], reply)

    def _owe_again(self, entries: Sequence[tuple[Command, str]]) -> None:
        # Interrupted: whether Redis got them is unknown. Owed again on this thread's
        # connection, closed so that reading them fails and sends them again.
        owed = self._owed()
        owed.connection.disconnect()
        self._owe(owed, list(entries), 0)

    def _note_unsent(
        self, entries: Sequence[tuple[Command, str]], why: BaseException, *, quiet: bool = False
    ) -> None:
        # ``quiet``: the app revokes them and says why (Redis may have queued them).
        ids = [task_id for _, task_id in entries]
        if not quiet:
            log.error("Redis did not queue task(s) %s: %s", ", ".join(ids), sentence(why))
        with self._lock:
            self._unsent += ids

    def _unconfirmed(
        self, entries: Sequence[tuple[Command, str]], why: BaseException
    ) -> Unanswered:
        ids = tuple(task_id for _, task_id in entries)
        log.error(
            "Redis did not answer whether it queued task(s) %s: %s They may run once it "
            "answers again",
            ", ".join(ids),
            sentence(why),
        )
        return Unanswered(str(why), ids)

    def settle_others(self, seconds: float) -> None:
        """Closing: read the replies other threads of this process owe, ``seconds`` in all.

        Each thread's are read once it is done with its connection (waited for within the
        same time). Those Redis has not answered by then (it is stalled, or the way back
        is cut), and those of a thread still using its connection then, are in doubt: noted
        for :meth:`take_unsent`, so the app revokes their tasks rather than leave their
        handles waiting for ever. What must be sent again is, as by :meth:`settle_owed`.
        Raises redis-py's ``ConnectionError`` as :meth:`settle_owed` does (the others are
        settled all the same).
        """
        deadline = time.monotonic() + seconds
        mine = getattr(self._local, "owed", None)
        with self._lock:
            owing = [o for o in self._owing.values() if o.pid == current_pid() and o is not mine]
        failed: Exception | None = None
        for owed in owing:
            try:
                self._settle_within(owed, deadline)
            except Unanswered as exc:  # sent again, then not answered for: in doubt too
                with self._lock:
                    self._unsent += exc.task_ids
            except (RedisConnectionError, RedisTimeoutError) as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _settle_within(self, owed: Owed, deadline: float) -> None:
        """Read another thread's owed replies until ``deadline`` (see :meth:`settle_others`)."""
        if not owed.using.acquire(timeout=max(0.0, deadline - time.monotonic())):
            with self._lock:  # (its thread changes the list under the lock too)
                in_doubt = list(owed.sent)
            if in_doubt:
                self._note_unsent(in_doubt, RedisTimeoutError("in use"), quiet=True)
            return
        try:
            sock = owed.connection._sock  # redis-py has no public accessor
            if sock is None:  # (dropped: reading fails at once, and they are sent again)
                self._settle(owed, closing=True)
                return
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                self._settle(owed, closing=True)
            finally:
                if owed.connection._sock is sock:  # kept: its thread waits as before
                    sock.settimeout(owed.connection.socket_timeout)
        finally:
            owed.using.release()

    def _close_owed(self, wait: float) -> None:
        """Read the replies every thread owes, then close their connections.

        Not those of a thread that uses its connection for longer than ``wait`` seconds
        (a command of its own): it reads them itself, and its connection is left to it.
        """
        with self._lock:
            owing = [owed for owed in self._owing.values() if owed.pid == current_pid()]
        for owed in owing:
            if not owed.using.acquire(timeout=wait):
                log.warning(
                    "closing: a thread still uses its Redis connection; the replies it owes "
                    "(%d) are left for it to read",
                    len(owed.sent),
                )
                continue
            try:
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                    self._settle(owed)
                owed.connection.disconnect()
            finally:
                owed.using.release()
