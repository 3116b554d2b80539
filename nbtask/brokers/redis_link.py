"""One Redis server as nbtask talks to it: a lean pipeline, its Lua scripts, clear errors.

Shared by the Redis store and the Redis Streams transport (which, on a Redis broker, use
the same server and so the same link). How commands are packed and replies read on a
connection is :mod:`nbtask.brokers.redis_resp`; the replies owed to publishes sent without
waiting, :mod:`nbtask.brokers.redis_owing`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    InvalidResponse,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask._process import current_pid
from nbtask._text import redact_url
from nbtask.brokers.forks import close_copies_in_forks
from nbtask.brokers.redis_errors import (
    REPLIES_LOST,
    RepliesLost,
    Unanswered,
    is_wrong_type,
    refusal,
    sent_unanswered,
    sentence,
    unreachable_hint,
)
from nbtask.brokers.redis_owing import OwedReplies
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
from nbtask.brokers.redis_runs import ServerRuns
from nbtask.errors import BrokerUnavailable, ConfigurationError, SendUnconfirmed

__all__ = ["LARGE_BYTES", "Command", "RedisLink"]

log = logging.getLogger(__name__)

#: How long Redis may take to answer a command before the call fails (redis-py 8's own
#: default, set for every version): a server that takes what is sent but says nothing
#: back (stalled, or a network path gone dead) never holds a caller forever.
ANSWER_SECONDS = 5.0


class RedisLink(OwedReplies):
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
        # Every connection made reads the server's run id: a restart is seen even where
        # a connection is made again at once, with no outage seen (see ServerRuns).
        self.runs = ServerRuns(url)
        self._redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=ANSWER_SECONDS,
            protocol=2,
            redis_connect_func=self.runs.connected,
        )
        self._patience = Patience(self._redis)
        super().__init__()
        self._scripts: dict[str, str] = {}
        self._sha: dict[str, str] = {}
        self._own: weakref.WeakSet[Any] = weakref.WeakSet()  # every thread's own connection
        close_copies_in_forks(self, RedisLink._sockets)
        self._translating = _Translating(self)

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
        if connection is None or getattr(self._local, "pid", None) != current_pid():
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

    def translate_errors(self) -> contextlib.AbstractContextManager[None]:
        """Turn connection errors, and refusals that pass, into :class:`BrokerUnavailable`.

        Refusals that pass: a server that is full, read-only, loading... (see
        :func:`~nbtask.brokers.redis_errors.refusal`). One object per link, entered by
        every publish and read: a generator-made context manager costs several calls more.
        """
        return self._translating

    def _translate(self, exc: BaseException) -> None:
        """Raise what :meth:`translate_errors` turns ``exc`` into; return to let it pass."""
        if isinstance(exc, Unanswered):
            ids = ", ".join(exc.task_ids)
            raise SendUnconfirmed(
                f"the Redis {self._role} at {redact_url(self.url)} was sent task(s) {ids} but "
                f"did not answer whether it queued them: {sentence(exc)} Those it read may "
                "still run once it answers again (is it stalled: a long command, a save, "
                "swapping?). Wait for them with get() then; a task the store has no record "
                "of then (app.store.get_record(task_id) is None) was never queued: send it "
                "again",
                exc.task_ids,
            ) from exc
        if isinstance(exc, (BusyLoadingError, ResponseError)):
            if (refused := refusal(exc)) is not None:
                raise self._refused(refused) from exc
            return
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
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

    def _refused(self, refused: tuple[str, str, str]) -> BrokerUnavailable:
        """What a refusal that passes (as ``refusal`` reads it) raises: as an outage.

        The server answers but takes no writes for now. A read served in the same round
        trip may have delivered an entry: the Streams transport looks for it next.
        """
        self.read_lost = True
        state, said, advice = refused
        return BrokerUnavailable(
            f"the Redis {self._role} at {redact_url(self.url)} refuses writes: it {state}: "
            f"{said} {advice}"
        )

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
                raise BrokerUnavailable(
                    f"{what}: the server refused: {exc}{self._database_advice(exc)}"
                ) from exc
            except TypeError as exc:  # redis-py passes a URL's unknown ?option= on, as a keyword
                raise ConfigurationError(f"{what}: the URL has an unknown option ({exc})") from exc
            self.load_scripts()

    def _database_advice(self, exc: ResponseError) -> str:
        """What to do about a database number the server does not have, if that was refused."""
        if "DB index is out of range" not in str(exc):
            return ""
        number = self.redis.connection_pool.connection_kwargs.get("db", 0)
        return (
            f" (database {number}): a Redis server has databases 0 to its `databases` setting "
            "less one (0-15 unless changed); end the URL with one of them, e.g. /0"
        )

    def load_scripts(self) -> None:
        """Load every script (a restarted server forgets them), in one round trip.

        On this thread's own connection: a pooled one taken by a call that a Ctrl-C then
        interrupts is never given back, and the pool is soon exhausted.
        """
        self.run([("SCRIPT", "LOAD", body) for body in self._scripts.values()], idempotent=True)

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

    def _sockets(self) -> list[Any]:
        """The sockets of this link's connections, own and pooled (for forks to close)."""
        return [getattr(c, "_sock", None) for c in [*self._own, *self._patience.pooled()]]

    def close(self) -> None:
        """Read the replies every thread owes, then close every connection.

        A thread in the middle of a command is waited for (as long as Redis may take to
        answer), never read from or disconnected under it.
        """
        self._close_owed(ANSWER_SECONDS)
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()
        self._redis.close()
        self._redis.connection_pool.disconnect()
        self._patience.close()

    def evalsha(self, script: str, keys: Sequence[str], *args: Any) -> Command:
        """The command that runs the script named ``script``."""
        return ("EVALSHA", self._sha[script], str(len(keys)), *keys, *args)  # (a str packs faster)

    def call(self, script: str, keys: Sequence[str], *args: Any, large: bool = False) -> Any:
        """Run one script and return its reply."""
        with self.translate_errors():
            return self.run_scripts([self.evalsha(script, keys, *args)], large=large)[0]

    def run_scripts(
        self,
        commands: Sequence[Command],
        *,
        large: bool = False,
        block_seconds: float = 0.0,
        idempotent: bool = False,
    ) -> list[Any]:
        """Run commands (scripts among them), loading the scripts if the server lost them."""
        try:
            return self.run(
                commands, large=large, block_seconds=block_seconds, idempotent=idempotent
            )
        except NoScriptError:
            # Only a restarted (emptied) server answers NOSCRIPT, and it answers it for
            # every script of the batch, so running the batch again runs each once.
            self.load_scripts()
            return self.run(
                commands, large=large, block_seconds=block_seconds, idempotent=idempotent
            )

    def _connection(self) -> Any:
        # One connection per thread, kept: taking one from the pool on every call costs
        # a health-check syscall, more than the command itself on a local server. A
        # process forked meanwhile (by task code) never uses its parent's socket
        # (current_pid(): renewed in every fork, where os.getpid() is a system call).
        connection = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != current_pid():
            self._patience.refuse_if_silent()  # (a bounded block's, dropped on giving up)
            pool = self._redis.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            self._local.connection, self._local.pid = connection, current_pid()
            self._own.add(connection)
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
        idempotent: bool = False,
    ) -> list[Any]:
        """Send ``commands`` in one write and read every reply.

        ``block_seconds`` is how long a blocking command (XREAD BLOCK) may wait; the
        socket's read timeout is stretched past it for this call. With ``raise_errors``
        false, error replies are returned in their places instead of raised. ``large``
        says an argument may be big enough to send without copying it.

        Commands whose connection drops once they are written, before their replies come,
        raise :class:`~nbtask.brokers.redis_errors.RepliesLost`: Redis may have run them,
        and a copy sent again could run twice. Unless running them twice changes nothing
        (``idempotent``: reads, script loads): then they are sent once more on a new
        connection.

        A pipeline without redis-py's per-command bookkeeping: on the hot path (publish,
        fetch, start, finish) that bookkeeping costs more than the round trip itself, so
        commands are packed by hiredis directly, and a blocking read's timeout is set once
        for all its replies.
        """
        with self._guard():  # (a closing link does not read or close it meanwhile)
            return self._run(commands, block_seconds, raise_errors, large, idempotent)

    def _run(
        self,
        commands: Sequence[Command],
        block_seconds: float,
        raise_errors: bool,
        large: bool,
        idempotent: bool,
    ) -> list[Any]:
        self.settle_owed()  # replies come in order: this thread's earlier ones first
        packed = None
        for attempt in (1, 2):
            connection = self._connection()
            fresh, written = True, False  # (a connection failing to be made: an outage)
            replies: list[Any] = []
            try:
                if packed is None:
                    packed = pack(commands) if large else [b"".join(map(pack_one, commands))]
                fresh = _made_anew(connection, look=not idempotent)
                written = True
                if not send_first(connection, packed):
                    written = False  # the first write was refused: not a byte left
                    raise RedisConnectionError("Redis closed the connection")
                read_replies(connection, len(commands), block_seconds, replies)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # A half-read connection cannot be reused; the next call reconnects.
                connection.disconnect()
                self.read_lost = True
                # Once more on a new connection only when Redis got none of it, or they
                # are idempotent; a fresh one failing is a real outage. Never after a write
                # otherwise: Redis may have run the commands and lost only the replies
                # (the connection dropped, or it stalled and runs them once it wakes), and
                # a copy would run twice (a task queued twice, follow-ups taken for no one).
                if self._gave_up(exc) or sent_unanswered(exc):
                    raise
                if written and not idempotent:
                    raise RepliesLost(f"{sentence(exc)} {REPLIES_LOST}") from exc
                if attempt == 2 or fresh:
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


class _Translating:
    """:meth:`RedisLink.translate_errors`: stateless, so one serves every thread and nesting."""

    __slots__ = ("_link",)

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if exc is not None:
            self._link._translate(exc)  # raises what it becomes, or returns: it passes


def _made_anew(connection: Any, *, look: bool) -> bool:
    """Connect ``connection`` unless it is open; whether it was made here.

    With ``look``, one Redis closed while it was idle (a restart, ``CLIENT KILL``, a server
    timeout) is made anew: nothing was sent on it since its last reply was read, so
    nothing is lost. Without (commands safe to run twice), the system call that looks is
    saved: such commands sent on a closed connection are sent again on a new one.
    """
    sock = connection._sock  # redis-py has no public "is connected"
    if sock is not None and not (look and closed_by_server(connection)):
        return False
    connection.disconnect()
    connection.connect()
    return True
