"""One frozen :class:`Settings` dataclass holding every tunable, with its unit and default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from nbtask.errors import ConfigurationError

__all__ = ["DEFAULT_QUEUE", "Settings"]

DEFAULT_QUEUE = "default"
_SCHEMES = ("redis", "rediss", "unix")
_KOMBU_SCHEMES = ("amqp", "amqps", "memory")


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
        Largest message accepted on either side.
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
        if self.max_redeliveries < 0:
            raise ConfigurationError("max_redeliveries must be 0 or more")
        if self.max_message_bytes < 1024:
            raise ConfigurationError("max_message_bytes must be at least 1024")
        if self.worker_concurrency is not None and self.worker_concurrency < 1:
            raise ConfigurationError("worker_concurrency must be at least 1")
        if self.embedded_workers < 1:
            raise ConfigurationError("embedded_workers must be at least 1")
        if not self.key_prefix or any(c in self.key_prefix for c in " \n{}"):
            raise ConfigurationError("key_prefix must be a non-empty word without spaces or braces")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``NBTASK_*`` variables, then apply ``overrides``.

        Recognised: ``NBTASK_BROKER``, ``NBTASK_RESULT_URL``, ``NBTASK_SECRET``,
        ``NBTASK_OLD_SECRETS`` (comma-separated),
        ``NBTASK_SECRET_FILE``, ``NBTASK_INSECURE``, ``NBTASK_KEY_PREFIX``, ``NBTASK_RESULT_TTL``,
        ``NBTASK_VISIBILITY_TIMEOUT``, ``NBTASK_HEARTBEAT_INTERVAL``,
        ``NBTASK_MAX_MESSAGE_BYTES``, ``NBTASK_MAX_AGE``, ``NBTASK_MAX_REDELIVERIES``,
        ``NBTASK_CONCURRENCY`` (worker child processes), ``NBTASK_WORKERS`` (embedded
        cluster child processes), ``NBTASK_DEFAULT_QUEUE``.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if env.get("NBTASK_BROKER"):
            values["broker_url"] = env["NBTASK_BROKER"]
        if env.get("NBTASK_RESULT_URL"):
            values["result_url"] = env["NBTASK_RESULT_URL"]
        if env.get("NBTASK_OLD_SECRETS"):
            values["old_secrets"] = tuple(
                part.strip() for part in env["NBTASK_OLD_SECRETS"].split(",") if part.strip()
            )
        if env.get("NBTASK_SECRET"):
            values["secret"] = env["NBTASK_SECRET"]
        elif env.get("NBTASK_SECRET_FILE"):
            values["secret"] = read_secret_file(env["NBTASK_SECRET_FILE"])
        for var, field in (
            ("NBTASK_INSECURE", "insecure"),
            ("NBTASK_TASK_IGNORE_RESULT", "task_ignore_result"),
            ("NBTASK_WORKER_DISABLE_RATE_LIMITS", "worker_disable_rate_limits"),
        ):
            if env.get(var, "").lower() in ("1", "true", "yes"):
                values[field] = True
        if env.get("NBTASK_KEY_PREFIX"):
            values["key_prefix"] = env["NBTASK_KEY_PREFIX"]
        if env.get("NBTASK_DEFAULT_QUEUE"):
            values["default_queue"] = env["NBTASK_DEFAULT_QUEUE"]
        numeric = {
            "NBTASK_RESULT_TTL": ("result_ttl", float),
            "NBTASK_VISIBILITY_TIMEOUT": ("visibility_timeout", float),
            "NBTASK_HEARTBEAT_INTERVAL": ("heartbeat_interval", float),
            "NBTASK_MAX_MESSAGE_BYTES": ("max_message_bytes", int),
            "NBTASK_MAX_AGE": ("max_age", float),
            "NBTASK_MAX_REDELIVERIES": ("max_redeliveries", int),
            "NBTASK_CONCURRENCY": ("worker_concurrency", int),
            "NBTASK_WORKERS": ("embedded_workers", int),
        }
        for var, (field, kind) in numeric.items():
            if env.get(var):
                try:
                    values[field] = kind(env[var])
                except ValueError:
                    raise ConfigurationError(
                        f"{var}={env[var]!r} is not a valid {kind.__name__}"
                    ) from None
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
        """The ``NBTASK_*`` variables that give a worker process these settings."""
        env = {
            "NBTASK_KEY_PREFIX": self.key_prefix,
            "NBTASK_DEFAULT_QUEUE": self.default_queue,
            "NBTASK_RESULT_TTL": repr(self.result_ttl),
            "NBTASK_VISIBILITY_TIMEOUT": repr(self.visibility_timeout),
            "NBTASK_HEARTBEAT_INTERVAL": repr(self.heartbeat_interval),
            "NBTASK_MAX_MESSAGE_BYTES": str(self.max_message_bytes),
            "NBTASK_MAX_REDELIVERIES": str(self.max_redeliveries),
        }
        if self.max_age is not None:
            env["NBTASK_MAX_AGE"] = repr(self.max_age)
        if self.broker_url is not None:
            env["NBTASK_BROKER"] = self.broker_url
        if self.result_url is not None:
            env["NBTASK_RESULT_URL"] = self.result_url
        if self.secret is not None:
            env["NBTASK_SECRET"] = self.secret
        if self.old_secrets:
            env["NBTASK_OLD_SECRETS"] = ",".join(self.old_secrets)
        if self.insecure:
            env["NBTASK_INSECURE"] = "1"
        if self.worker_disable_rate_limits:
            env["NBTASK_WORKER_DISABLE_RATE_LIMITS"] = "1"
        return env

    @property
    def replay_window(self) -> float:
        """How old a message may be and still run: ``max_age``, else ``result_ttl``."""
        return self.result_ttl if self.max_age is None else self.max_age

    @property
    def is_local_broker(self) -> bool:
        """True for a unix socket or loopback broker, where a missing secret is tolerable."""
        if self.broker_url is None:
            return True
        parts = urlsplit(self.broker_url)
        return parts.scheme == "unix" or parts.hostname in ("127.0.0.1", "localhost", "::1")


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
    if redis_only and parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unsupported result store URL {url!r}: use redis://host:port/db, rediss://… or "
            "unix:///path/to/redis.sock"
        )
    if parts.scheme in _KOMBU_SCHEMES:
        if parts.scheme != "memory" and not parts.hostname:
            raise ConfigurationError(f"broker URL {url!r} names no host")
        return
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unsupported broker URL {url!r}: use redis://host:port/db, rediss://…, "
            "unix:///path/to/redis.sock, or amqp://user:password@host:5672/vhost (RabbitMQ, "
            "with NBTASK_RESULT_URL set to a Redis URL)"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ConfigurationError(f"broker URL {url!r} names no socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"broker URL {url!r} names no host")
