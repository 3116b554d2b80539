"""One Redis server as nbtask talks to it: a lean pipeline, its Lua scripts, clear errors.

Shared by the Redis store and the Redis Streams transport (which, on a Redis broker, use
the same server and so the same link). How commands are packed and replies read on a
connection is :mod:`nbtask.brokers.redis_resp`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    InvalidResponse,
    NoScriptError,
    OutOfMemoryError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask._text import redact_url
from nbtask.brokers.base import PIPELINE_WINDOW
from nbtask.brokers.redis_errors import is_wrong_type, sentence, unreachable_hint
from nbtask.brokers.redis_owed import OWED_BYTES, Owed
from nbtask.brokers.redis_patience import Patience
from nbtask.brokers.redis_resp import (
    LARGE_BYTES,
    Command,
    closed_by_server,
    pack,
    pack_one,
    read_replies,
    send_first,
)
from nbtask.errors import BrokerUnavailable, ConfigurationError

__all__ = ["LARGE_BYTES", "Command", "RedisLink"]

log = logging.getLogger(__name__)

#: How long Redis may take to answer a command before the call fails (redis-py 8's own
#: default, set for every version): a server that takes what is sent but says nothing
#: back (stalled, or a network path gone dead) never holds a caller forever.
ANSWER_SECONDS = 5.0


class RedisLink:
    """Connections to one Redis server, one per thread, and the scripts run on it.

    Parameters
    ----------
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL of the server.
    role
        ``"broker"`` or ``"result store"``: how errors name the server.
    """

    def __init__(self, url: str, role: str) -> None:
        self.url = url
        self._role = role
        self._unreachable = (
            f"cannot reach the Redis {role} at {redact_url(url)}",
            unreachable_hint(role, url),
        )
        # Typed as Any: redis-py's reply types are unions over decode_responses that would
        # need a cast at every call; the callers check the shapes they read instead.
        # RESP2 keeps raw replies in one known shape for the hot path.
        self._redis: Any = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=ANSWER_SECONDS, protocol=2
        )
        self._patience = Patience(self._redis)
        self._scripts: dict[str, str] = {}
        self._sha: dict[str, str] = {}
        self._local = threading.local()
        self._owing: dict[int, Owed] = {}  # by id(): every thread's replies not read yet
        self._unsent: list[str] = []
        self._lock = threading.Lock()

    @property
    def redis(self) -> Any:
        """redis-py's client, on pooled connections, for commands off the hot path.

        This thread's unread replies are read first: its publishes sent without waiting
        then have run, so the pooled connection sees every task this thread sent. In an
        :meth:`answering_within` block, a client whose connections wait that long.
        """
        self.settle_owed()
        if (seconds := self._patience.seconds) is None:
            return self._redis
        self._patience.refuse_if_silent()
        return self._patience.client(seconds)

    @contextlib.contextmanager
    def answering_within(self, seconds: float) -> Iterator[None]:
        """In the block, this thread gives up on an answer Redis owes after ``seconds``.

        The connection that waited is dropped (a half-read one is never reused); the
        block's commands then fail at once for ``seconds`` (see
        :mod:`~nbtask.brokers.redis_patience`). Failures raise :class:`BrokerUnavailable`
        through :meth:`translate_errors`. One socket call on entry, one on exit.
        """
        outer = self._patience.begin(seconds)
        self._wait_at_most(seconds)
        try:
            yield
        finally:
            self._patience.end(outer)
            default = self._redis.connection_pool.connection_kwargs["socket_timeout"]
            self._wait_at_most(default if outer[0] is None else outer[0])

    def _wait_at_most(self, seconds: float | None) -> None:
        """Set how long this thread's own connection waits for an answer (made or not yet)."""
        connection = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != os.getpid():
            return
        connection.socket_timeout = seconds  # read again when it (re)connects
        if connection._sock is not None:
            connection._sock.settimeout(seconds)

    def _gave_up(self, exc: BaseException) -> bool:
        """Whether this thread gives up on Redis for ``exc``: a timeout in a bounded block.

        Then its own connection is dropped and forgotten, so the block's next commands
        fail at once (see :meth:`_connection`); one still owed replies (a pooled command
        timed out) keeps it, to read them within the same patience.
        """
        if not isinstance(exc, RedisTimeoutError) or self._patience.seconds is None:
            return False
        self._patience.give_up()
        own = getattr(self._local, "connection", None)
        if own is not None and (own._sock is None or not self.owed):
            own.disconnect()
            self._local.connection = None
        return True

    def add_scripts(self, scripts: Mapping[str, str]) -> None:
        """Make ``scripts`` (name -> Lua) callable with :meth:`evalsha`."""
        for name, body in scripts.items():
            self._scripts[name] = body
            self._sha[name] = hashlib.sha1(body.encode()).hexdigest()

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn connection errors, and a full server's refusals, into :class:`BrokerUnavailable`."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if self._gave_up(exc):
                raise BrokerUnavailable(
                    f"the Redis {self._role} at {redact_url(self.url)} did not answer within "
                    f"{self._patience.seconds:g} s: {sentence(exc)}"
                ) from exc
            if isinstance(exc, RedisTimeoutError) and not str(exc).startswith("Timeout connecting"):
                raise BrokerUnavailable(
                    f"the Redis {self._role} at {redact_url(self.url)} takes connections but "
                    f"did not answer in time: {sentence(exc)} Is it stalled (a long command, "
                    "a save, swapping), or is the network path to it cut?"
                ) from exc
            what, hint = self._unreachable
            if isinstance(exc, (AuthenticationError, AuthorizationError)):
                hint = "Check the user name and password in the URL (redis://user:password@host)"
            raise BrokerUnavailable(f"{what}: {sentence(exc)} {hint}") from exc
        except OutOfMemoryError as exc:  # it answers, but takes no writes: as good as gone
            raise BrokerUnavailable(
                f"the Redis {self._role} at {redact_url(self.url)} is full: {sentence(exc)} "
                "Free memory there or raise its maxmemory (an eviction policy would drop "
                "queued tasks and results)"
            ) from exc

    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless the server answers; load the scripts."""
        what, hint = self._unreachable
        with self.translate_errors():
            try:
                self.redis.ping()
            except InvalidResponse as exc:  # something else listens there (RabbitMQ, a web server)
                raise BrokerUnavailable(
                    f"{what}: the server there does not speak Redis ({exc}); check the host "
                    f"and port. {hint}"
                ) from exc
            except ResponseError as exc:  # refused while connecting: "DB index is out of range"
                raise BrokerUnavailable(f"{what}: the server refused: {exc}") from exc
            except TypeError as exc:  # redis-py passes a URL's unknown ?option= on, as a keyword
                raise ConfigurationError(f"{what}: the URL has an unknown option ({exc})") from exc
            self.load_scripts()

    def load_scripts(self) -> None:
        """Load every script (a restarted server forgets them), in one round trip.

        On this thread's own connection: a pooled one taken by a call that a Ctrl-C then
        interrupts is never given back, and the pool is soon exhausted.
        """
        self.run([("SCRIPT", "LOAD", body) for body in self._scripts.values()])

    def hset_replacing(self, key: str, field: str, value: str | bytes) -> None:
        """``HSET``; a key of another type there was not written by nbtask, and is replaced."""
        try:
            self.redis.hset(key, field, value)
        except ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            log.error("replaced %s: not a hash, not written by nbtask", key)
            self.redis.delete(key)
            self.redis.hset(key, field, value)

    def close(self) -> None:
        """Read the replies every thread owes, then close every connection."""
        with self._lock:
            owing = [owed for owed in self._owing.values() if owed.pid == os.getpid()]
        for owed in owing:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                self._settle(owed)
            owed.connection.disconnect()
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()
        self._redis.close()
        self._redis.connection_pool.disconnect()
        self._patience.close()

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

    def evalsha(self, script: str, keys: Sequence[str], *args: Any) -> Command:
        """The command that runs the script named ``script``."""
        return ("EVALSHA", self._sha[script], len(keys), *keys, *args)

    def call(self, script: str, keys: Sequence[str], *args: Any, large: bool = False) -> Any:
        """Run one script and return its reply."""
        with self.translate_errors():
            return self.run_scripts([self.evalsha(script, keys, *args)], large=large)[0]

    def run_scripts(self, commands: Sequence[Command], *, large: bool = False) -> list[Any]:
        """Run commands (scripts among them), loading the scripts if the server lost them."""
        try:
            return self.run(commands, large=large)
        except NoScriptError:
            # Only a restarted (emptied) server answers NOSCRIPT, and it answers it for
            # every script of the batch, so running the batch again runs each once.
            self.load_scripts()
            return self.run(commands, large=large)

    def send_unanswered(self, command: Command, task_id: str) -> None:
        """Send task ``task_id``'s publish script without waiting for Redis's reply.

        The reply is read by this thread's next command, by :meth:`settle_owed` or by
        :meth:`close`; a thread owing :data:`PIPELINE_WINDOW` replies, or
        :data:`OWED_BYTES` of commands (kept to be sent again), reads them first. A
        publish Redis did not run (the connection dropped before its reply came and it
        cannot be sent again, or Redis answered with an error) is noted for
        :meth:`take_unsent`. Sending one again is safe: the script refuses a task id that
        already has a record, so a copy that did get through is never queued twice.
        """
        owed = self._owed()
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
            self._owe(owed, [(command, task_id)], len(packed))
            # Looked at once the command is on its way (looking lets go of the GIL): a
            # server gone since the last reply (stopped, restarted) never read it.
            sent = send_first(owed.connection, [packed])
            gone = not sent or closed_by_server(owed.connection._sock)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            owed.connection.disconnect()
            self._gave_up(exc)
            self.read_lost = True
            # Whether Redis got this one, or the ones owed before it, is unknown: send
            # them all again now, on a new connection, and raise if that fails too.
            self._send_again(self._take_owed(owed))
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
            self.run_scripts([command])

    @property
    def owed(self) -> int:
        """How many replies to :meth:`send_unanswered` this thread has not read yet."""
        owed = getattr(self._local, "owed", None)
        return len(owed.sent) if owed is not None and owed.pid == os.getpid() else 0

    def settle_owed(self) -> None:
        """Read the replies this thread owes (see :meth:`send_unanswered`).

        Raises redis-py's ``ConnectionError`` when some must be sent again and Redis
        cannot be reached: they are then noted for :meth:`take_unsent`.
        """
        owed = getattr(self._local, "owed", None)
        if owed is not None and owed.sent and owed.pid == os.getpid():
            self._settle(owed)

    def settle_ended(self) -> None:
        """Read the replies threads that ended still owe (sending again what needs it).

        Nobody else would before :meth:`close`: a publish whose connection dropped before
        Redis read it would wait unsent until then, its task never run nor reported.
        Raises redis-py's ``ConnectionError`` as :meth:`settle_owed` does.
        """
        pid = os.getpid()
        with self._lock:  # taken out while read: two threads never read one connection
            ended = [o for o in self._owing.values() if o.pid == pid and not o.thread.is_alive()]
            for owed in ended:
                del self._owing[id(owed)]
        for owed in ended:
            try:
                self._settle(owed)
            finally:
                if not owed.sent:  # (an interrupted read left some owed, kept again)
                    owed.connection.disconnect()

    def take_unsent(self) -> list[str]:
        """Ids of tasks sent by :meth:`send_unanswered` that Redis never queued; each once."""
        with self._lock:
            out, self._unsent = self._unsent, []
        return out

    def _owed(self) -> Owed:
        connection = self._connection()
        owed: Owed | None = getattr(self._local, "owed", None)
        if owed is None or owed.connection is not connection:
            owed = self._local.owed = Owed(connection, os.getpid())
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

    def _settle(self, owed: Owed) -> None:
        # A publish leaves ``owed`` only once its reply is read or it is handed on to be
        # sent again, so an interruption (Ctrl-C) anywhere here loses none.
        settled = 0
        again: list[tuple[Command, str]] = []
        try:
            for entry in owed.sent:
                try:
                    owed.connection.read_response()
                except NoScriptError:  # the server restarted empty: nothing ran
                    again.append(entry)
                except ResponseError as exc:
                    self._note_unsent([entry], exc)
                settled += 1
        except (RedisConnectionError, RedisTimeoutError) as exc:
            owed.connection.disconnect()
            self._gave_up(exc)
            self.read_lost = True
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
        self._send_again(again)

    def _send_again(self, entries: Sequence[tuple[Command, str]]) -> None:
        if not entries:
            return
        try:
            self.load_scripts()
            replies = self.run([command for command, _ in entries], raise_errors=False)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._note_unsent(entries, exc)
            raise
        except BaseException:
            # Interrupted: whether Redis got them is unknown. Owed again on this thread's
            # connection, closed so that reading them fails and sends them again.
            owed = self._owed()
            owed.connection.disconnect()
            self._owe(owed, list(entries), 0)
            raise
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, ResponseError):
                self._note_unsent([entry], reply)

    def _note_unsent(self, entries: Sequence[tuple[Command, str]], why: BaseException) -> None:
        ids = [task_id for _, task_id in entries]
        log.error("Redis did not queue task(s) %s: %s", ", ".join(ids), sentence(why))
        with self._lock:
            self._unsent += ids

    def _connection(self) -> Any:
        # One connection per thread, kept: taking one from the pool on every call costs
        # a health-check syscall, more than the command itself on a local server. A
        # process forked meanwhile (by task code) never uses its parent's socket.
        connection = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != os.getpid():
            self._patience.refuse_if_silent()  # (a bounded block's, dropped on giving up)
            pool = self._redis.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            self._local.connection, self._local.pid = connection, os.getpid()
            if (seconds := self._patience.seconds) is not None:
                connection.socket_timeout = seconds
        return connection

    def run(
        self,
        commands: Sequence[Command],
        *,
        block_seconds: float = 0.0,
        raise_errors: bool = True,
        large: bool = False,
    ) -> list[Any]:
        """Send ``commands`` in one write and read every reply.

        ``block_seconds`` is how long a blocking command (XREAD BLOCK) may wait; the
        socket's read timeout is stretched past it for this call. With ``raise_errors``
        false, error replies are returned in their places instead of raised. ``large``
        says an argument may be big enough to send without copying it.

        A pipeline without redis-py's per-command bookkeeping: on the hot path (publish,
        fetch, start, finish) that bookkeeping costs more than the round trip itself, so
        commands are packed by hiredis directly, and a blocking read's timeout is set once
        for all its replies.
        """
        self.settle_owed()  # replies come in order: this thread's earlier ones first
        packed = None
        for attempt in (1, 2):
            connection = self._connection()
            fresh = connection._sock is None  # redis-py has no public "is connected"
            replies: list[Any] = []
            try:
                if packed is None:
                    packed = pack(commands) if large else [b"".join(map(pack_one, commands))]
                if not send_first(connection, packed):
                    raise RedisConnectionError("Redis closed the connection")
                read_replies(connection, len(commands), block_seconds, replies)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # A half-read connection cannot be reused; the next call reconnects.
                connection.disconnect()
                self.read_lost = True
                # A connection that went stale while idle (the server restarted) fails
                # before the first reply: the server never ran these commands. Once more
                # on a new connection; a fresh one failing is a real outage. Not when a
                # bounded block gives up: a server that answers nothing would cost two.
                if self._gave_up(exc) or attempt == 2 or fresh or replies:
                    raise
                continue
            except BaseException:
                connection.disconnect()
                raise
            break
        if raise_errors:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        return replies
