"""The options ``@app.task`` accepts, checked when a task is defined."""

from __future__ import annotations

import inspect
import os
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from nbtask._text import value_text
from nbtask.core.datasets import dataset_names
from nbtask.errors import ConfigurationError
from nbtask.settings import MAX_SECONDS, is_finite_number
from nbtask.wire.message import LATEST_TIME

__all__ = [
    "MAX_TASK_ID_CHARS",
    "TASK_OPTIONS",
    "WORKER_OWN_SIGNALS",
    "check_task_function",
    "check_task_id",
    "class_options",
    "exception_classes",
    "is_seconds",
    "new_task_id",
    "parse_rate",
    "positive",
    "queue_name",
    "retry_kwargs",
    "seconds",
    "seconds_from_now",
    "terminate_signal",
    "time_at",
    "validate_options",
]

# Options @app.task accepts (Celery's names); anything else is refused at decoration time.
TASK_OPTIONS = frozenset(
    {
        "name",
        "bind",
        "base",
        "queue",
        "acks_late",
        "ignore_result",
        "expires",
        "max_retries",
        "default_retry_delay",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "autoretry_for",
        "dont_autoretry_for",
        "retry_kwargs",
        "throws",
        "rate_limit",
        "time_limit",
        "soft_time_limit",
        "serializer",
        "reject_on_worker_lost",
        "priority",
        "compression",
        "backend",
        "requires",
        "typing",
        "track_started",
        "store_errors_even_if_ignored",
        "started_after",  # nbtask's own: when a run's STARTED event goes
    }
)
#: What ``retry_kwargs`` may hold: the keywords of ``Task.retry`` an autoretry passes on.
_RETRY_KWARGS = ("countdown", "eta", "max_retries")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
NO_PRIORITY = (
    "priority is not supported: each nbtask queue is served first in, first out, on "
    "Redis and RabbitMQ alike. Send urgent work to a queue of its own (queue='urgent') "
    "and give it workers: on Redis, workers started with -Q urgent,default take from "
    "'urgent' first; on RabbitMQ, start workers that serve -Q urgent alone"
)


def check_time_limits(hard: float | None, soft: float | None, where: str = "") -> None:
    """Refuse a soft time limit at or past the hard one: it could never be raised."""
    if hard is not None and soft is not None and soft >= hard:
        raise ConfigurationError(
            f"soft_time_limit={soft:g} is not below time_limit={hard:g}{where}: the process "
            "would be killed before SoftTimeLimitExceeded could be raised in the task; give "
            "a soft limit below the hard one (soft_time_limit=50, time_limit=60)"
        )


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``@app.task`` options; return them as class attributes (rate limits parsed)."""
    unknown = sorted(set(options) - TASK_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown task option(s) {', '.join(unknown)}; known: {', '.join(sorted(TASK_OPTIONS))}"
        )
    attrs = dict(options)
    _check_types(attrs)
    for name in ("time_limit", "soft_time_limit", "expires", "retry_backoff_max"):
        if attrs.get(name) is not None:
            attrs[name] = positive(name, attrs[name])
    for name in ("default_retry_delay", "started_after"):  # 0: at once (as in Celery)
        if attrs.get(name) is not None:
            attrs[name] = not_negative(name, attrs[name])
    check_time_limits(attrs.get("time_limit"), attrs.get("soft_time_limit"))
    if "rate_limit" in attrs:
        attrs["rate_limit"] = parse_rate(attrs["rate_limit"])
    if "requires" in attrs:
        attrs["requires"] = dataset_names(attrs["requires"])
    for name in ("autoretry_for", "dont_autoretry_for", "throws"):
        if name in attrs:
            attrs[name] = exception_classes(name, attrs[name])
    if "retry_kwargs" in attrs:
        attrs["retry_kwargs"] = retry_kwargs(attrs["retry_kwargs"])
    _refuse_unsupported(attrs)
    if "backend" in attrs:
        backend = attrs.pop("backend")
        if backend not in (None, False, True):
            raise ConfigurationError(
                "backend= takes None/False (keep no result record) or True (the app's store)"
            )
        attrs["store_result"] = bool(backend)
    return attrs


def class_options(body: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The task options a class body sets (``rate_limit = "100/s"``), as ``@app.task``'s.

    Checked and converted by :func:`validate_options`, so a base class's options work as
    the decorator's do, and a wrong one fails when the class is made, with the same
    error, after ``where`` (the class).
    """
    given = {name: value for name, value in body.items() if name in TASK_OPTIONS - {"base"}}
    if not given:
        return {}
    try:
        return validate_options(given)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def _refuse_unsupported(attrs: dict[str, Any]) -> None:
    """Refuse a serializer nbtask lacks, and a priority or a compression, saying why."""
    if "serializer" in attrs and attrs["serializer"] not in ("cloudpickle", "json"):
        raise ConfigurationError(
            f"serializer must be 'cloudpickle' or 'json', got {attrs['serializer']!r}"
        )
    if attrs.pop("priority", None) is not None:
        raise ConfigurationError(NO_PRIORITY)
    if attrs.pop("compression", None) is not None:
        raise ConfigurationError(
            "compression is not supported: nbtask does not compress messages; a large "
            "argument or result travels as blobs, outside the message"
        )


def exception_classes(name: str, value: object) -> tuple[type[BaseException], ...]:
    """``value`` (one exception class, or a list or tuple of them) as a tuple; else an error."""
    classes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(e, type) and issubclass(e, BaseException) for e in classes):
        raise ConfigurationError(f"{name} takes exception classes, got {value!r}")
    return classes


def retry_kwargs(value: object) -> dict[str, Any]:
    """Celery's ``retry_kwargs``: what an autoretry passes to ``retry()``, checked now."""
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"retry_kwargs takes a dict of retry() keywords (e.g. {{'max_retries': 5, "
            f"'countdown': 2}}), got {value!r}"
        )
    unknown = sorted(set(value) - set(_RETRY_KWARGS))
    if unknown:
        raise ConfigurationError(
            f"retry_kwargs: unknown retry() keyword(s) {', '.join(map(str, unknown))}; "
            f"an autoretry passes on {', '.join(_RETRY_KWARGS)}"
        )
    kwargs = dict(value)
    if kwargs.get("countdown") is not None:
        kwargs["countdown"] = seconds("retry_kwargs' countdown", kwargs["countdown"])
    limit = kwargs.get("max_retries")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigurationError(
            f"retry_kwargs' max_retries must be a whole number >= 0 or None, got {limit!r}"
        )
    return kwargs


_BOOLS = ("bind", "acks_late", "retry_jitter", "typing", "track_started")
_OPTIONAL_BOOLS = ("ignore_result", "reject_on_worker_lost", "store_errors_even_if_ignored")
_OPTIONAL_STRINGS = ("name",)


def _check_types(attrs: Mapping[str, Any]) -> None:
    # A string "false" is truthy: refuse it rather than silently mean True.
    for name in _BOOLS:
        if name in attrs and not isinstance(attrs[name], bool):
            raise ConfigurationError(f"{name} must be True or False, got {attrs[name]!r}")
    for name in _OPTIONAL_BOOLS:
        if attrs.get(name) is not None and not isinstance(attrs[name], bool):
            raise ConfigurationError(f"{name} must be True, False or None, got {attrs[name]!r}")
    for name in _OPTIONAL_STRINGS:
        value = attrs.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
    if attrs.get("queue") is not None:
        queue_name(attrs["queue"], "queue")
    max_retries = attrs.get("max_retries")
    if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
        raise ConfigurationError(
            f"max_retries must be a whole number >= 0 or None, got {max_retries!r}"
        )
    backoff = attrs.get("retry_backoff")
    if backoff is not None and not isinstance(backoff, (bool, int, float)):
        raise ConfigurationError(f"retry_backoff must be True/False or seconds, got {backoff!r}")


def queue_name(value: object, what: str) -> str:
    """``value`` if a worker can serve it as a queue; else one error naming ``what``.

    ``nbtask worker -Q`` strips spaces from its names, so a name with spaces around it
    would be served by no worker, and its tasks would wait for good.
    """
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ConfigurationError(
            f"{what} must be a queue name without spaces around it, as workers serve it "
            f"(nbtask worker -Q near-s3), got {value!r}"
        )
    return value


def parse_rate(rate: object) -> float | None:
    """``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number (per second) -> tasks per second."""
    if rate is None:
        return None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
        return float(rate)
    if isinstance(rate, str):
        amount, _, unit = rate.strip().partition("/")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if value > 0 and (unit or "s") in _RATE_UNITS:
            return value / _RATE_UNITS[unit or "s"]
    raise ConfigurationError(
        f"rate_limit={rate!r} is not a rate: use e.g. '10/s', '100/m', '1000/h' or a number"
    )


# A duration's bound, as a setting's: a soft time limit past about 9.2e9 s cannot even be
# set (OverflowError in the worker), and a limit or an expiry of decades is a slip.
_AT_MOST = f"at most {MAX_SECONDS:.0e} (about 31 years)"


def positive(name: str, value: float) -> float:
    """``value`` as a float, if a positive number of seconds, at most ``MAX_SECONDS``."""
    if not is_finite_number(value) or not 0 < value <= MAX_SECONDS:
        raise ConfigurationError(
            f"{name} must be a positive number of seconds, {_AT_MOST}, got {value_text(value)}"
        )
    return float(value)


def not_negative(name: str, value: float) -> float:
    """``value`` as a float, if a number of seconds from 0 to ``MAX_SECONDS``."""
    if not is_finite_number(value) or not 0 <= value <= MAX_SECONDS:
        raise ConfigurationError(
            f"{name} must be a number of seconds, 0 or more, {_AT_MOST}, got {value_text(value)}"
        )
    return float(value)


#: Signals a worker process uses itself (a soft time limit, an interrupt's recheck).
WORKER_OWN_SIGNALS = ("SIGALRM", "SIGUSR1")


def terminate_signal(value: str | int) -> str:
    """The name of the signal ``value`` names (``"SIGKILL"``, ``"KILL"``, ``9``); else an error.

    A revoke's ``signal=``, as Celery's: sent by name, which means the same on every
    platform (a number may not). One a worker process uses itself is refused.
    """
    name = None
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            name = signal.Signals(value).name
        elif isinstance(value, str):
            upper = value.strip().upper()
            name = signal.Signals[upper if upper.startswith("SIG") else f"SIG{upper}"].name
    except (KeyError, ValueError):
        pass
    if name is None:
        raise ConfigurationError(
            f"signal={value!r} names no signal here: use e.g. 'SIGTERM' (the default), "
            "'SIGKILL' or 9"
        )
    if name in WORKER_OWN_SIGNALS:
        raise ConfigurationError(
            f"signal={value!r}: nbtask's worker processes use {name} themselves (the soft "
            "time limit, an interrupt's recheck); use 'SIGTERM' (an interrupt, the default) "
            "or 'SIGKILL'"
        )
    return name


def is_seconds(value: object) -> bool:
    """A finite number of any size (an integer no float holds too), not a bool."""
    return is_finite_number(value) or (isinstance(value, int) and not isinstance(value, bool))


def seconds(name: str, value: float | None) -> float | None:
    """``value`` (a number, or ``None``) as seconds; else one error naming the option.

    Refused too past ``LATEST_TIME`` seconds either way: no time a worker keeps is that
    far from 1970, and so none is from now.
    """
    if value is None:
        return None
    if not is_seconds(value):
        raise ConfigurationError(f"{name}={value_text(value)} is not a number of seconds")
    return time_at(name, value, 0.0)


def seconds_from_now(name: str, value: float | None) -> float | None:
    """``value`` as :func:`seconds`, refused too if as many seconds from now are too far.

    A countdown: a worker counts it from when it sends the task.
    """
    checked = seconds(name, value)
    if checked is not None:
        time_at(name, checked, time.time())
    return checked


# What to do instead, per option, of a time too late and of one too early.
_LATER = {
    "eta": "give an earlier one (epoch seconds or an aware datetime)",
    "expires": "give an earlier one, or leave expires out for a task that never expires",
}
_EARLIER = {"expires": "give a time still to come (a task past it is never run)"}


def time_at(name: str, value: float, base: float, given: object = None) -> float:
    """``base`` (epoch seconds) plus ``value`` seconds, if a time a worker keeps.

    Else one error naming the option ``name`` and the value ``given`` (default
    ``value``): a worker refuses a task whose times are past
    :data:`~nbtask.wire.message.LATEST_TIME` (or before minus it), and an integer no
    float holds would raise ``OverflowError``.
    """
    # Compared first as given: an integer too large for a float compares without converting.
    if -2 * LATEST_TIME <= value <= 2 * LATEST_TIME:
        moment = base + float(value)
        if -LATEST_TIME <= moment <= LATEST_TIME:  # the worker's own check, on the same float
            return moment
    option = name.rpartition(" ")[2]  # "retry_kwargs' countdown": its advice is countdown's
    if value > 0:
        where = "past the end of year 9999, the latest"
        advice = _LATER.get(option, "give fewer seconds")
    else:
        where = "more than 8,000 years before 1970, the earliest"
        advice = _EARLIER.get(option, f"a time already past means now: leave {option} out")
    raise ConfigurationError(
        f"{name}={value_text(value if given is None else given)} is out of range: it makes "
        f"a time {where} nbtask keeps (a worker would refuse the task); {advice}; "
        "nothing was sent"
    )


def check_task_function(func: object, requires: Sequence[str] = ()) -> None:
    """Refuse what ``@app.task`` cannot make a task of, with one line saying why.

    ``requires``: the datasets it requires, which its workers pass as keyword arguments.
    """
    if not callable(func):
        raise ConfigurationError(f"@app.task needs a function, got {func!r}")
    if not isinstance(getattr(func, "__qualname__", None), str):
        # A partial or a callable object: no name to give the task, none to import it by.
        raise ConfigurationError(
            f"@app.task needs a function (def or lambda), got a {type(func).__name__} "
            f"({func!r:.80}); wrap it in one: @app.task def task(x): return that(x)"
        )
    name = getattr(func, "__qualname__", func)
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise ConfigurationError(
            f"{name} is a generator function: as a task its body would never run (calling "
            "it only makes a generator, which cannot be sent back); return a list instead"
        )
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no readable signature: not checked, as calls are not
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [dataset for dataset in requires if dataset not in parameters]
    if missing:
        raise ConfigurationError(
            f"{name} requires {', '.join(map(repr, missing))}, which its workers pass as a "
            f"keyword argument of that name: give {name} a parameter {missing[0]}"
        )


#: The longest task id (``apply_async(task_id=...)``); a worker's slot keeps one whole.
MAX_TASK_ID_CHARS = 64
# Task ids end up in Redis key names, shared memory slots and ETA members.
_TASK_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MAX_TASK_ID_CHARS - 1}}}")


def check_task_id(value: object, what: str = "task_id") -> str:
    """``value`` if it can be a task's id; else one error naming ``what``."""
    if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
        raise ConfigurationError(
            f"{what}={value!r} is not a valid id: use 1 to {MAX_TASK_ID_CHARS} letters, "
            "digits, '_', '-' or '.', starting with a letter or digit"
        )
    return value


class _RandomBytes:
    """Bytes from the OS's random source, read a batch at a time.

    Reading them lets go of the GIL: in a kernel, a thread waiting for it (IOPub, history)
    then runs first, and a cell's message leaves only once it gives it back. Read for
    256 task ids at once, the message almost never waits for that. A forked process
    starts empty (it never hands out its parent's bytes) and with a lock of its own (one
    another thread held at the fork would stay held there for good).
    """

    def __init__(self, batch: int = 4096) -> None:
        self._batch = batch
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._bytes, self._at = b"", 0

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._at + count > len(self._bytes):
                self._bytes, self._at = os.urandom(self._batch), 0
            start, self._at = self._at, self._at + count
            return self._bytes[start : self._at]


_RANDOM = _RandomBytes()


def new_task_id() -> str:
    """A fresh task id: 32 hex digits of a random version-4 UUID, as ``uuid.uuid4().hex``.

    Made from the random bytes directly: :class:`uuid.UUID` costs several times more, once
    per task sent.
    """
    raw = bytearray(_RANDOM.take(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()
