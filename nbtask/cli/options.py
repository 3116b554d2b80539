"""The options several ``nbtask`` commands share, and the settings a command runs with.

Kept apart from the commands so that each command module (:mod:`nbtask.cli.serve`,
:mod:`nbtask.cli.admin`, :mod:`nbtask.cli.headless`) and the parser read them from one place.
"""

from __future__ import annotations

import argparse
import math

from nbtask.core.datasets import data_queue
from nbtask.core.holding import holder_queue, is_holder_queue
from nbtask.errors import ConfigurationError
from nbtask.settings import DEFAULT_QUEUE, MAX_SECONDS, Settings, read_secret_file

__all__ = [
    "QUEUES_HELP",
    "broker_options",
    "positive_int",
    "queue_names",
    "seconds",
    "settings_for",
]


def broker_options(parser: argparse.ArgumentParser, *, from_app: bool = False) -> None:
    """The options naming a broker and its secret, shared by the commands that use one.

    ``from_app``: the command reads the settings of the ``-A`` module's App (``worker``).
    """
    app = "the -A module's App(broker=...), else " if from_app else ""
    parser.add_argument(
        "-b", "--broker", default=None, help=f"broker URL (default: {app}$NBTASK_BROKER)"
    )
    parser.add_argument(
        "--secret-file",
        default=None,
        help=f"file holding the signing secret (default: {app.replace('broker', 'secret')}"
        "$NBTASK_SECRET, else the file $NBTASK_SECRET_FILE names)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept no secret (anyone with broker access can run code)",
    )
    parser.add_argument(
        "--key-prefix",
        default=None,
        help=f"key prefix (default: $NBTASK_KEY_PREFIX, else {Settings.key_prefix})",
    )


#: The help of ``-Q``: the default queue follows the environment.
QUEUES_HELP = f"comma-separated queues (default: $NBTASK_DEFAULT_QUEUE, else {DEFAULT_QUEUE})"


def queue_names(text: str | None, settings: Settings) -> list[str]:
    """The queues of a ``-Q`` option (the default queue without one), each once."""
    if text is None:
        return [settings.default_queue]
    names = list(dict.fromkeys(q.strip() for q in text.split(",") if q.strip()))
    if not names:
        raise ConfigurationError(
            f"-Q {text!r} names no queue: give comma-separated names, e.g. -Q default,near-data "
            "(or leave -Q out for the default queue)"
        )
    for name in names:
        if name.startswith(data_queue("")) or is_holder_queue(name):
            raise ConfigurationError(
                f"-Q {name}: queues named {data_queue('')}* and {holder_queue('')}* are "
                "nbtask's own (a dataset's holders, one process); for a dataset's queue use "
                "--data NAME=module:function"
            )
    return names


def seconds(text: str, *, zero: bool) -> float:
    """A number of seconds for an option: finite, not negative, and not 0 unless ``zero``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value <= MAX_SECONDS) or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({least})")
    return value


def positive_int(text: str) -> int:
    """A whole number of 1 or more for an option (``-c``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def settings_for(args: argparse.Namespace, app_settings: Settings | None = None) -> Settings:
    """The settings a command runs with: its options over the environment, checked.

    ``app_settings``: those of the App the ``-A`` modules define (``worker``), which the
    options override and which override the environment, as the App itself does when it
    sends: its workers then serve where it sends.
    """
    # An option given empty is a mistake to report, not a reason to fall back on the
    # environment's value (or the default key prefix).
    overrides: dict[str, object] = {}
    if getattr(args, "broker", None) is not None:
        overrides["broker_url"] = args.broker
    if getattr(args, "secret_file", None) is not None:
        overrides["secret"] = read_secret_file(args.secret_file)
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    if getattr(args, "key_prefix", None) is not None:
        overrides["key_prefix"] = args.key_prefix
    if app_settings is not None:
        settings = app_settings.replace(**overrides)
    else:
        settings = Settings.from_env(None, **overrides)
    if args.command == "run" and settings.broker_url is None:
        return settings  # the embedded cluster, like ``cluster``
    if args.command != "cluster":
        if settings.broker_url is None:
            raise ConfigurationError(
                "no broker: pass -b URL, set NBTASK_BROKER"
                + (", or give the -A module's App(broker=...)" if args.command == "worker" else "")
            )
        if not (settings.secret or settings.insecure):
            how = (
                "pass --secret-file FILE or set NBTASK_SECRET (the workers' secret), or "
                "NBTASK_INSECURE=1"
                if args.command == "run"
                else "set NBTASK_SECRET or pass --secret-file FILE (the same secret as the "
                "clients'), or --insecure"
            )
            raise ConfigurationError(f"no secret: {how}")
    return settings
