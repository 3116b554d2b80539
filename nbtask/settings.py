"""One frozen :class:`Settings` dataclass holding every tunable, with its unit and default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from nbtask.errors import ConfigurationError

__all__ = ["DEFAULT_QUEUE", "ENVIRONMENT", "KOMBU_SCHEMES", "REDIS_SCHEMES", "Settings"]

DEFAULT_QUEUE = "default"
#: Broker URL schemes served by Redis (Streams), and by kombu (AMQP, in-process memory).
REDIS_SCHEMES = ("redis", "rediss", "unix")
KOMBU_SCHEMES = ("amqp", "amqps", "memory")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Configuration of an :class:`~nbtask.App` and of ``nbtask worker``.

    Durations are float seconds; sizes are bytes.

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
        How long final states and results are kept for re-attaching, seconds.
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
        if isinstance(self.old_secrets, str):  # one secret given as a plain string
            object.__setattr__(self, "old_secrets", (self.old_secrets,))
        else:
            object.__setattr__(self, "old_secrets", tuple(self.old_secrets))
        if self.broker_url is not None:
            _check_broker_url(self.broker_url)
        if self.result_url is not None:
            _check_broker_url(self.result_url, redis_only=True)
        self._check_durations()
        self._check_counts()
        if not self.key_prefix or any(c in self.key_prefix for c in " \n{}"):
            raise ConfigurationError("key_prefix must be a non-empty word without spaces or braces")

    def _check_durations(self) -> None:
        for name in ("result_ttl", "visibility_timeout", "heartbeat_interval", "max_age"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
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
        minimums = {
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
        for name, least in minimums.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigurationError(f"{name} must be at least {least}, got {value}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``NBTASK_*`` variables, then apply ``overrides``.

        Each field has one variable (:data:`ENVIRONMENT`: ``NBTASK_BROKER``,
        ``NBTASK_SECRET``, ``NBTASK_CONCURRENCY``...); ``NBTASK_SECRET_FILE`` names a file
        holding the secret when ``NBTASK_SECRET`` is unset. Flags take ``1``/``true``/
        ``yes``; ``NBTASK_OLD_SECRETS`` is comma-separated.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, (var, parse) in _ENV.items():
            if env.get(var):
                values[field] = _read(var, env[var], parse)
        if "secret" not in values and env.get("NBTASK_SECRET_FILE"):
            values["secret"] = read_secret_file(env["NBTASK_SECRET_FILE"])
        values.update(overrides)
        return cls.from_mapping(values)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> Settings:
        """Settings for the broker at ``url``; other fields from ``overrides``."""
        return cls.from_mapping({"broker_url": url, **overrides})

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Settings:
        """Build settings from a mapping, rejecting unknown names with a clear error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` applied (unknown names are refused)."""
        return self.from_mapping({**dataclasses.asdict(self), **changes})

    def to_env(self) -> dict[str, str]:
        """The ``NBTASK_*`` variables that give another process (a worker) these settings."""
        env = {}
        for field, (var, _) in _ENV.items():
            value = getattr(self, field)
            if value is None or value is False or value == ():
                continue
            if value is True:
                env[var] = "1"
            elif isinstance(value, tuple):
                env[var] = ",".join(value)
            else:
                env[var] = repr(value) if isinstance(value, float) else str(value)
        return env

    @property
    def replay_window(self) -> float:
        """How old a message may be and still run: ``max_age``, else ``result_ttl``."""
        return self.result_ttl if self.max_age is None else self.max_age


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def _secrets(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# Each field's environment variable and how its text is read: one table for both ways.
_ENV: dict[str, tuple[str, Callable[[str], object]]] = {
    "broker_url": ("NBTASK_BROKER", str),
    "result_url": ("NBTASK_RESULT_URL", str),
    "secret": ("NBTASK_SECRET", str),
    "old_secrets": ("NBTASK_OLD_SECRETS", _secrets),
    "insecure": ("NBTASK_INSECURE", _flag),
    "key_prefix": ("NBTASK_KEY_PREFIX", str),
    "default_queue": ("NBTASK_DEFAULT_QUEUE", str),
    "result_ttl": ("NBTASK_RESULT_TTL", float),
    "visibility_timeout": ("NBTASK_VISIBILITY_TIMEOUT", float),
    "heartbeat_interval": ("NBTASK_HEARTBEAT_INTERVAL", float),
    "max_message_bytes": ("NBTASK_MAX_MESSAGE_BYTES", int),
    "blob_threshold": ("NBTASK_BLOB_THRESHOLD", int),
    "blob_dir": ("NBTASK_BLOB_DIR", str),
    "keep_threshold": ("NBTASK_KEEP_THRESHOLD", int),
    "fetch_budget": ("NBTASK_FETCH_BUDGET", int),
    "worker_memory_budget": ("NBTASK_WORKER_MEMORY_BUDGET", int),
    "move_bytes": ("NBTASK_MOVE_BYTES", int),
    "max_age": ("NBTASK_MAX_AGE", float),
    "max_redeliveries": ("NBTASK_MAX_REDELIVERIES", int),
    "worker_concurrency": ("NBTASK_CONCURRENCY", int),
    "embedded_workers": ("NBTASK_WORKERS", int),
    "task_ignore_result": ("NBTASK_TASK_IGNORE_RESULT", _flag),
    "worker_disable_rate_limits": ("NBTASK_WORKER_DISABLE_RATE_LIMITS", _flag),
}
#: Each setting's environment variable, ``{field: "NBTASK_..."}``.
ENVIRONMENT = {field: var for field, (var, _) in _ENV.items()}


def _read(var: str, text: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(text)
    except ValueError:
        kind = getattr(parse, "__name__", "value")
        raise ConfigurationError(f"{var}={text!r} is not a valid {kind}") from None


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """Read a secret from a file, stripping surrounding whitespace."""
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigurationError(f"the secret file {path} is empty")
    return secret


def _check_broker_url(url: str, *, redis_only: bool = False) -> None:
    parts = urlsplit(url)
    if redis_only and parts.scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"unsupported result store URL {url!r}: use redis://host:port/db, rediss://… or "
            "unix:///path/to/redis.sock"
        )
    if parts.scheme in KOMBU_SCHEMES:
        if parts.scheme != "memory" and not parts.hostname:
            raise ConfigurationError(f"broker URL {url!r} names no host")
        return
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"unsupported broker URL {url!r}: use redis://host:port/db, rediss://…, "
            "unix:///path/to/redis.sock, or amqp://user:password@host:5672/vhost (RabbitMQ, "
            "with NBTASK_RESULT_URL set to a Redis URL)"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigurationError(f"broker URL {url!r} names no socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"broker URL {url!r} names no host")
