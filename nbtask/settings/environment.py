"""The ``NBTASK_*`` environment variables: which one gives each setting, and how it is read.

One table, ``_ENV``, holds each :class:`~nbtask.settings.Settings` field's variable and
the parser of its text; it is read both ways (:func:`read_environment` for
``Settings.from_env``, :func:`variables_of` for ``Settings.to_env``), and
:data:`ENVIRONMENT` is its public ``{field: variable}`` view.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from nbtask.errors import ConfigurationError

__all__ = ["ENVIRONMENT", "env_flag", "read_environment", "read_secret_file", "variables_of"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ValueError(word)  # "2" or "enabled" must not quietly mean off
    return word in _TRUE


def _secrets(text: str) -> tuple[str, ...]:
    found = tuple(part.strip() for part in text.split(",") if part.strip())
    if not found:
        raise ValueError(text)  # " , " names no secret: not the same as leaving it unset
    return found


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
# The flags read elsewhere (with env_flag), not settings: NBTASK_WIDGETS, the notebook's.
_OTHER_FLAGS = ("NBTASK_WIDGETS",)
# Every NBTASK_* variable nbtask reads: the settings', and those read elsewhere.
_VARIABLES = (*ENVIRONMENT.values(), "NBTASK_SECRET_FILE", *_OTHER_FLAGS)
# What each parser expects, for the error naming a variable it could not read.
_KINDS: dict[object, str] = {
    float: "number of seconds",
    int: "whole number",
    _flag: f"flag: use one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}",
    _secrets: "comma-separated list of secrets",
}


def _read(var: str, text: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(text)
    except ValueError:
        raise ConfigurationError(
            f"{var}={text!r} is not a valid {_KINDS.get(parse, 'value')}"
        ) from None


def env_flag(var: str, *, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """The flag ``var`` (``"NBTASK_WIDGETS"``) of ``environ`` (default :data:`os.environ`).

    Read as the settings' flags are: ``default`` when unset or empty, and a value that is
    none of ``1``/``true``/``yes``/``on``/``0``/``false``/``no``/``off`` raises
    :class:`ConfigurationError`.
    """
    text = (os.environ if environ is None else environ).get(var)
    return bool(_read(var, text, _flag)) if text else default


def read_environment(env: Mapping[str, str]) -> dict[str, object]:
    """The settings ``env``'s ``NBTASK_*`` variables give, ``{field: value}``.

    A variable that looks like a misspelt one, or whose text its parser refuses, raises
    :class:`ConfigurationError`; ``NBTASK_SECRET_FILE`` is read when ``NBTASK_SECRET``
    is unset.
    """
    _check_names(env)
    for var in _OTHER_FLAGS:  # read elsewhere, when needed: refused here, at the start
        env_flag(var, default=True, environ=env)
    values: dict[str, object] = {}
    for field, (var, parse) in _ENV.items():
        if env.get(var):
            values[field] = _read(var, env[var], parse)
    if "secret" not in values and env.get("NBTASK_SECRET_FILE"):
        values["secret"] = read_secret_file(env["NBTASK_SECRET_FILE"])
    return values


def variables_of(values: Mapping[str, object]) -> dict[str, str]:
    """The ``NBTASK_*`` variables that give these settings (``{field: value}``) elsewhere."""
    env = {}
    for field, (var, _) in _ENV.items():
        value = values[field]
        if value is None or value is False or value == ():
            continue
        if value is True:
            env[var] = "1"
        elif isinstance(value, tuple):
            env[var] = ",".join(value)
        else:
            env[var] = repr(value) if isinstance(value, float) else str(value)
    return env


def _check_names(env: Mapping[str, str]) -> None:
    """Refuse an ``NBTASK_*`` variable that looks like a misspelt one: it would do nothing."""
    for var in env:
        if var.startswith("NBTASK_") and var not in _VARIABLES:
            close = difflib.get_close_matches(var, _VARIABLES, n=1, cutoff=0.8)
            if close:
                raise ConfigurationError(
                    f"{var} is not an nbtask variable; did you mean {close[0]}? "
                    "(rename or unset it)"
                )


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """Read a secret from a file, stripping surrounding whitespace.

    A leading ``~`` means the home directory, as in a shell: the path may come from where
    no shell expanded it (a magic's argument, a quoted ``NBTASK_SECRET_FILE``).
    """
    if not str(path).strip():
        raise ConfigurationError("the secret file's name is empty: give the path of a file")
    try:
        secret = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except RuntimeError:  # ``~user`` whose home cannot be found
        raise ConfigurationError(f"cannot read the secret file {path}: no such user") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigurationError(f"the secret file {path} is empty")
    return secret
