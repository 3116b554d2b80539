"""One frozen :class:`Settings` dataclass holding every tunable, with its unit and default.

The ``NBTASK_*`` variables that give each setting, and how their text is read, are in
:mod:`nbtask.settings.environment`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from nbtask._text import redact_url, value_text
from nbtask.errors import ConfigurationError
from nbtask.settings.environment import (
    ENVIRONMENT,
    env_flag,
    read_environment,
    variables_of,
)
from nbtask.settings.environment import read_secret_file as read_secret_file

__all__ = [
    "DEFAULT_QUEUE",
    "ENVIRONMENT",
    "KOMBU_SCHEMES",
    "MAX_SECONDS",
    "REDIS_SCHEMES",
    "Settings",
    "env_flag",
    "is_finite_number",
]

DEFAULT_QUEUE = "default"
#: Broker URL schemes served by Redis (Streams), and by kombu (AMQP, in-process memory).
REDIS_SCHEMES = ("redis", "rediss", "unix")
KOMBU_SCHEMES = ("amqp", "amqps", "memory")
#: The longest duration a setting takes (about 31 years): Redis refuses expiry times far
#: beyond it, and a longer one is a slip of the keyboard.
MAX_SECONDS = 1e9
# Every key and queue name starts with the prefix: RabbitMQ refuses a queue name over 255
# bytes, and a worker deletes a signed revoke over MAX_REVOKE_BYTES (8 KiB) as forged.
MAX_KEY_PREFIX_CHARS = 100
_FLAGS = ("insecure", "task_ignore_result", "worker_disable_rate_limits")
_OPTIONAL_TEXTS = ("broker_url", "result_url", "secret", "blob_dir")
_DURATIONS = ("result_ttl", "visibility_timeout", "heartbeat_interval", "max_age")
# The least value of each count and size; worker_concurrency may also be None.
_MINIMUMS = {
    "max_redeliveries": 0,
    "max_message_bytes": 1024,
    "blob_threshold": 0,
    "keep_threshold": 0,
    "fetch_budget": 0,
    "worker_memory_budget": 0,
    "move_bytes": 0,
    "worker_concurrency": 1,
    "embedded_workers": 1,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Configuration of an :class:`~nbtask.App` and of ``nbtask worker``.

    Durations are float seconds (finite, at most :data:`MAX_SECONDS`); sizes and counts are
    whole numbers; flags are ``True``/``False``. A value of another type is refused.

    Parameters
    ----------
    broker_url
        ``redis://host:port/db``, ``rediss://…`` or ``unix:///path/redis.sock``; or a
        kombu URL (``amqp://``, ``amqps://``, ``memory://``), which needs ``result_url``.
        ``None`` starts the embedded local cluster.
    result_url
        Redis URL of the result store used with a kombu broker (records, the atomic start
        check, re-attach, ETA parking, worker registry). Ignored with a Redis broker,
        which is its own store.
    secret
        The shared HMAC key that signs every message. Required for a remote broker.
    old_secrets
        Keys still accepted, never used to sign: for rotating ``secret`` without losing
        messages in flight (see the README's security model).
    insecure
        Accept a remote broker without a secret (a fixed, public key is used and a
        warning is shown). Anyone who can write to the broker can then run code.
    key_prefix
        Prefix of every Redis key nbtask creates, so several apps can share a server.
    default_queue
        Queue used when a task names none.
    result_ttl
        How long final states and results are kept for re-attaching, seconds. Also how
        long a worker process holds a kept value that no live notebook session names any
        more (its kernel was killed), counted from the last sign of one.
    visibility_timeout
        How long an unacknowledged message may go without a lease renewal before
        another worker reclaims it, seconds. Live workers renew leases every heartbeat.
    heartbeat_interval
        How often workers renew their presence and leases, seconds. A worker is taken
        as dead after three missed heartbeats.
    max_message_bytes
        Largest message accepted on either side. Values of ``blob_threshold`` bytes or
        more never count against it: they travel out of band, as blobs.
    blob_threshold
        Arguments and results (pickled) of this many bytes or more travel out of band: their
        large parts (numpy and pandas buffers, long byte strings) are kept in the store as
        content-addressed blobs, signed by digest, and only the digests ride in the message.
    keep_threshold
        A name a ``%%task`` cell assigns whose pickled size is this many bytes or more stays
        on the workers: the notebook gets a reference with a preview, and fetches the value
        only when a local cell reads it (``%%task --keep NAME`` / ``--fetch NAME`` decide per
        name).
    fetch_budget
        The most bytes a kept value may have to be fetched into the notebook without
        ``force=True``.
    worker_memory_budget
        The most bytes of kept values each worker process holds in memory, live, so that
        later cells that read them start at once. Past it, the least recently used are
        dropped from memory; their store copy stays (until ``result_ttl``), so a later
        cell that reads one loads it again from there. 0 holds nothing in memory. Each
        worker process has its own, so a worker may hold up to its concurrency times this.
    move_bytes
        Work that reads kept values goes to the process holding them; when that process is
        busy with a task and another that could take the work is idle, the work goes there
        instead (loading the values from their store copy, which it then holds) if the
        values the busy one holds for it total at most this many bytes. 0 always waits for
        the holder.
    blob_dir
        A directory on a memory filesystem that every client and worker of this store can
        reach, because they all run on one host: blobs then go through it (shared
        memory) instead of the store. The embedded cluster, and any store reached through
        a unix socket, use one under ``/dev/shm`` without being told.
    max_age
        Messages older than this (not counting an ETA) are rejected as replays, seconds.
        At most ``result_ttl``, so every message young enough to run still finds the
        record that tells a worker whether it already ran. Defaults to ``result_ttl``.
    max_redeliveries
        How many times an ``acks_late`` message may be redelivered after its worker
        died before it is dead-lettered with a FAILURE result.
    worker_concurrency
        Child processes of a worker; ``None`` means one per CPU core.
    task_ignore_result
        Default for tasks that do not set ``ignore_result`` (Celery's setting).
    worker_disable_rate_limits
        Workers ignore every ``rate_limit`` (and skip the bucket check entirely).
    embedded_workers
        Child processes of the embedded cluster's worker.
    """

    broker_url: str | None = None
    result_url: str | None = None
    secret: str | None = None
    old_secrets: tuple[str, ...] = ()
    insecure: bool = False
    key_prefix: str = "nbtask"
    default_queue: str = DEFAULT_QUEUE
    result_ttl: float = 86400.0
    visibility_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    max_message_bytes: int = 512 * 1024 * 1024
    blob_threshold: int = 4 * 1024 * 1024
    blob_dir: str | None = None
    keep_threshold: int = 64 * 1024 * 1024
    fetch_budget: int = 4 * 1024 * 1024 * 1024
    worker_memory_budget: int = 4 * 1024 * 1024 * 1024
    move_bytes: int = 256 * 1024 * 1024
    max_age: float | None = None
    max_redeliveries: int = 5
    worker_concurrency: int | None = None
    embedded_workers: int = 2
    task_ignore_result: bool = False
    worker_disable_rate_limits: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        self._check_words()
        if self.broker_url is not None:
            _check_broker_url(self.broker_url)
        if self.result_url is not None:
            _check_broker_url(self.result_url, redis_only=True)
        self._check_durations()
        self._check_counts()

    def _check_types(self) -> None:
        # A flag given as text is the dangerous case: insecure="False" is truthy.
        for name in _FLAGS:
            flag = getattr(self, name)
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{_label(name)} must be True or False, got {flag!r}")
        for name in _OPTIONAL_TEXTS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                shown = type(value).__name__ if name == "secret" else repr(value)  # not shown
                raise ConfigurationError(f"{_label(name)} must be a string or None, got {shown}")
        self._check_secrets()

    def _check_secrets(self) -> None:
        # Secrets are never repeated in an error: it may end up in a log.
        old = (self.old_secrets,) if isinstance(self.old_secrets, str) else self.old_secrets
        if not isinstance(old, (list, tuple)) or not all(isinstance(o, str) and o for o in old):
            raise ConfigurationError(f"{_label('old_secrets')} must be a list of non-empty strings")
        object.__setattr__(self, "old_secrets", tuple(old))
        if any(key != key.strip() for key in (self.secret or "", *old)):
            raise ConfigurationError(
                "a secret (NBTASK_SECRET, NBTASK_OLD_SECRETS) has spaces or a line break around "
                "it: remove them (a secret file's are stripped, so a worker reading the same "
                "secret from one would refuse every message)"
            )

    def _check_words(self) -> None:
        prefix = self.key_prefix
        if not (isinstance(prefix, str) and prefix and _is_word(prefix)):
            raise ConfigurationError(
                f"{_label('key_prefix')} must be a non-empty word without spaces or braces, "
                f"got {prefix!r}"
            )
        if len(prefix) > MAX_KEY_PREFIX_CHARS:
            raise ConfigurationError(
                f"{_label('key_prefix')} is {len(prefix)} characters long: use at most "
                f"{MAX_KEY_PREFIX_CHARS} (every key and queue name starts with it)"
            )
        if self.blob_dir is not None and not self.blob_dir.strip():
            raise ConfigurationError(
                f"{_label('blob_dir')} must be a folder's path, or None, got {self.blob_dir!r}"
            )
        queue = self.default_queue
        if not (isinstance(queue, str) and queue and queue == queue.strip()):
            raise ConfigurationError(
                f"{_label('default_queue')} must be a queue name without spaces around it, "
                f"got {queue!r}"
            )

    def _check_durations(self) -> None:
        for name in _DURATIONS:
            value = getattr(self, name)
            if value is None and name == "max_age":
                continue
            if not is_finite_number(value) or not 0 < value <= MAX_SECONDS:
                raise ConfigurationError(
                    f"{_label(name)} must be a positive number of seconds, at most "
                    f"{MAX_SECONDS:.0e}, got {value_text(value)}"
                )
        if self.result_ttl < 1:
            raise ConfigurationError(
                f"{_label('result_ttl')} must be at least 1 second (Redis keeps keys for whole "
                f"seconds), got {self.result_ttl!r}"
            )
        if self.visibility_timeout <= 3 * self.heartbeat_interval:
            raise ConfigurationError(
                "visibility_timeout must be longer than three heartbeat_interval periods, "
                "or live workers would lose their leases"
            )
        if self.max_age is not None and self.max_age > self.result_ttl:
            raise ConfigurationError(
                "max_age must not exceed result_ttl: an older message could find its "
                "record expired and run a second time"
            )

    def _check_counts(self) -> None:
        for name, least in _MINIMUMS.items():
            value = getattr(self, name)
            if value is None and name == "worker_concurrency":
                continue
            if isinstance(value, float) and value.is_integer():  # 64e6 means 64000000
                value = int(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigurationError(f"{_label(name)} must be a whole number, got {value!r}")
            if value < least:
                raise ConfigurationError(f"{_label(name)} must be at least {least}, got {value}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``NBTASK_*`` variables, then apply ``overrides``.

        Each field has one variable (:data:`ENVIRONMENT`: ``NBTASK_BROKER``,
        ``NBTASK_SECRET``, ``NBTASK_CONCURRENCY``...); ``NBTASK_SECRET_FILE`` names a file
        holding the secret when ``NBTASK_SECRET`` is unset. Flags take ``1``/``true``/
        ``yes``/``on`` or ``0``/``false``/``no``/``off``; ``NBTASK_OLD_SECRETS`` is
        comma-separated. A variable that looks like a misspelt one (``NBTASK_CONCURENCY``)
        is refused, naming the one it resembles.

        Parameters
        ----------
        environ
            The variables to read; ``None`` reads :data:`os.environ`.
        **overrides
            Fields set over what the variables say.
        """
        values = read_environment(os.environ if environ is None else environ)
        values.update(overrides)
        return cls.from_mapping(values)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> Settings:
        """Settings for the broker at ``url``; the environment is not read.

        Parameters
        ----------
        url
            The broker URL (``broker_url``).
        **overrides
            Other fields; the rest keep their defaults.
        """
        return cls.from_mapping({"broker_url": url, **overrides})

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Settings:
        """Build settings from a mapping, rejecting unknown names with a clear error.

        Parameters
        ----------
        values
            ``{field: value}``; an unknown name is refused naming the field it resembles.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            named = [_with_guess(name, known) for name in unknown]
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(named)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` applied, checked again.

        Parameters
        ----------
        **changes
            ``field=value``; unknown names are refused as by :meth:`from_mapping`.
        """
        return self.from_mapping({**dataclasses.asdict(self), **changes})

    def to_env(self) -> dict[str, str]:
        """The ``NBTASK_*`` variables that give another process (a worker) these settings."""
        return variables_of({field: getattr(self, field) for field in ENVIRONMENT})

    @property
    def replay_window(self) -> float:
        """How old a message may be and still run: ``max_age``, else ``result_ttl``."""
        return self.result_ttl if self.max_age is None else self.max_age


def _label(name: str) -> str:
    """``worker_concurrency (NBTASK_CONCURRENCY)``: the setting as either way of giving it."""
    return f"{name} ({ENVIRONMENT[name]})" if name in ENVIRONMENT else name


def _is_word(text: str) -> bool:
    """No spaces and no braces (which would make a Redis Cluster hash tag)."""
    return not any(c.isspace() or c in "{}" for c in text)


def is_finite_number(value: object) -> bool:
    """A real number that is not a bool, nan or infinite: a time nbtask can wait for.

    An integer too large for a float is not one either (a float of it raises).
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


#: Why Celery's ``timezone`` and ``enable_utc`` are not needed.
_NO_TIMEZONE = (
    "nothing: nbtask's times are instants, epoch seconds or aware datetimes "
    "(apply_async(eta=datetime(..., tzinfo=...)); a naive eta is refused), and "
    "h.date_done is an aware UTC datetime: show it in a zone with .astimezone(zone)"
)

# Celery's names for a setting nbtask has under another name, or keeps elsewhere: a
# resemblance of spelling would point a migrating user at the wrong one.
_CELERY_SETTINGS = {
    "backend": "result_url (a Redis URL; the result store)",
    "result_backend": "result_url (a Redis URL; the result store)",
    "result_expires": "result_ttl (seconds)",
    "task_default_queue": "default_queue",
    "worker_prefetch_multiplier": "nothing: a worker child takes one task when idle",
    "task_serializer": "@app.task(serializer=...)",
    "result_serializer": "@app.task(serializer=...)",
    "task_acks_late": "@app.task(acks_late=True)",
    "task_time_limit": "@app.task(time_limit=...)",
    "task_soft_time_limit": "@app.task(soft_time_limit=...)",
    "task_routes": "App(routes=...)",
    "include": "nbtask worker -A module (once per module)",
    "imports": "nbtask worker -A module (once per module)",
    "task_always_eager": "task.apply(args) to run a task here, in this process",
    "task_eager_propagates": "task.apply(args, throw=True)",
    "task_track_started": "nothing: every task reports STARTED when a worker begins it",
    "task_reject_on_worker_lost": "@app.task(reject_on_worker_lost=...)",
    "beat_schedule": (
        "nothing: nbtask has no periodic scheduler (no beat); run a loop or a cron job "
        "that calls task.delay(...) on schedule, or task.apply_async(eta=...) for one "
        "later run"
    ),
    "broker_transport_options": (
        "visibility_timeout=... (seconds), the option Celery's users set there: how long "
        "an unacknowledged message goes without a lease renewal before another worker "
        "takes it (a live worker renews its leases); nbtask's transports take no other "
        "options"
    ),
    "timezone": _NO_TIMEZONE,
    "enable_utc": _NO_TIMEZONE,
}


def _with_guess(name: str, known: Iterable[str]) -> str:
    """``name``, followed by the known name it resembles if there is one."""
    if name in _CELERY_SETTINGS:
        return f"{name} (Celery's; here use {_CELERY_SETTINGS[name]})"
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _check_broker_url(url: str, *, redis_only: bool = False) -> None:
    parts = urlsplit(url)
    shown = redact_url(url)  # an error may be logged or shown in a shared notebook
    _check_port(url)
    if redis_only and parts.scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"unsupported result store URL {shown!r}: use redis://host:port/db, rediss://… or "
            "unix:///path/to/redis.sock"
        )
    if parts.scheme in KOMBU_SCHEMES:
        if parts.scheme != "memory" and not parts.hostname:
            raise ConfigurationError(f"broker URL {shown!r} names no host")
        return
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"unsupported broker URL {shown!r}: use redis://host:port/db, rediss://…, "
            "unix:///path/to/redis.sock, or amqp://user:password@host:5672/vhost (RabbitMQ, "
            "with NBTASK_RESULT_URL set to a Redis URL)"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigurationError(f"broker URL {shown!r} names no socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"broker URL {shown!r} names no host")
    # redis-py would ignore a database that is not a number, and use database 0.
    if parts.scheme != "unix" and not re.fullmatch(r"/?\d*", parts.path):
        raise ConfigurationError(
            f"broker URL {shown!r}: the path {parts.path!r} is not a database number "
            "(use redis://host:port/0)"
        )


def _check_port(url: str) -> None:
    shown = redact_url(url)
    try:
        urlsplit(url).port  # noqa: B018 - reading it is the check
    except ValueError:
        raise ConfigurationError(
            f"broker URL {shown!r} has a bad port: use a number from 1 to 65535"
        ) from None
