"""The ``nbtask`` command (also ``python -m nbtask``): its parser and :func:`main`.

The parser is the one place that lists every command and its options; each command's
work is in a module of its own: :mod:`~nbtask.cli.serve` (``worker``, ``cluster``),
:mod:`~nbtask.cli.admin` (``status``, ``cancel``, ``purge``, ``inspect``, ``log``) and
:mod:`~nbtask.cli.headless` (``run``), with the options they share in
:mod:`~nbtask.cli.options`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from nbtask._version import __version__
from nbtask.cli.admin import run_cancel, run_inspect, run_log, run_purge, run_status
from nbtask.cli.headless import run_headless
from nbtask.cli.options import QUEUES_HELP, broker_options, positive_int, seconds
from nbtask.cli.serve import data_option, run_cluster, run_worker
from nbtask.errors import NbtaskError
from nbtask.settings import Settings

__all__ = ["main"]

EXIT_USAGE = 2
_TASK_ID_HELP = "the task's id, or a unique prefix of it (8 characters or more)"
# Options of ``celery worker`` a migrating user passes by habit (``-l`` is understood).
_CELERY_WORKER_OPTIONS = {"-n", "--hostname", "-P", "--pool", "--autoscale", "-E", "-B", "--beat"}
_CELERY_WORKER_OPTIONS |= {"-O", "-Ofair", "-D", "--detach", "--max-tasks-per-child"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nbtask`` command line; return the exit code."""
    parser, subparsers = _parser()
    commands = tuple(subparsers)
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if w in commands), None)
    if command and words[0].startswith("-") and words[0] not in ("-h", "--help", "--version"):
        # ``nbtask -A app worker`` (Celery's order): argparse would call the URL or module
        # after the option an invalid command.
        parser.print_usage(sys.stderr)
        print(
            f"nbtask: error: {words[0]} goes after the command: nbtask {command} {words[0]} ...",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args, extra = parser.parse_known_args(words)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    if extra:
        return _unknown_options(subparsers[args.command], args.command, extra)
    try:
        code: int = args.run(args)
    except NbtaskError as exc:
        print(f"nbtask {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _loglevel_option(parser: argparse.ArgumentParser) -> None:
    """``-l``/``--loglevel``, as Celery's worker spells it (``-l info``)."""
    parser.add_argument(
        "-l",
        "--loglevel",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="log level (default: INFO)",
    )


def _unknown_options(parser: argparse.ArgumentParser, command: str, extra: Sequence[str]) -> int:
    """One error line for words the command does not take, pointing to its ``--help``."""
    celery_only = [w for w in extra if w.split("=")[0] in _CELERY_WORKER_OPTIONS]
    hint = (
        f" ({', '.join(celery_only)}: Celery worker options nbtask has no counterpart for)"
        if celery_only
        else ""
    )
    parser.print_usage(sys.stderr)
    print(
        f"nbtask {command}: error: unrecognized arguments: {' '.join(extra)}{hint}; see "
        f"nbtask {command} --help",
        file=sys.stderr,
    )
    return EXIT_USAGE


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the parser of each of its commands by name."""
    parser = argparse.ArgumentParser(
        prog="nbtask", description="Run nbtask workers and inspect tasks."
    )
    parser.add_argument("--version", action="version", version=f"nbtask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    worker = sub.add_parser("worker", help="serve tasks from a broker")
    broker_options(worker, from_app=True)
    worker.add_argument("-Q", "--queues", default=None, help=QUEUES_HELP)
    worker.add_argument(
        "-c",
        "--concurrency",
        type=positive_int,
        default=None,
        help="child processes (default: $NBTASK_CONCURRENCY, else one per CPU core)",
    )
    worker.add_argument(
        "-A",
        "--app",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE[:attr] and register the tasks it defines (repeatable); as with "
        "Celery's -A, the App it defines gives the broker, secret and key prefix: -b and the "
        "other options win over the App's settings, which win over NBTASK_* variables (as "
        "the App itself sends)",
    )
    data_option(worker)
    _loglevel_option(worker)
    worker.set_defaults(run=run_worker)

    cluster = sub.add_parser(
        "cluster", help="run a private Redis and workers in the foreground (the embedded cluster)"
    )
    cluster.add_argument(
        "-c",
        "--concurrency",
        type=positive_int,
        default=None,
        help=f"child processes (default: $NBTASK_WORKERS, else {Settings.embedded_workers}; "
        "as the cluster a notebook starts)",
    )
    cluster.add_argument(
        "-A",
        "--app",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE[:attr] and register the tasks it defines (repeatable); the "
        "cluster runs its own private Redis with its own secret: an App's broker, secret and "
        "key prefix are not used (a client reaches the cluster with the exports it prints)",
    )
    data_option(cluster)
    cluster.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    cluster.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    cluster.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    cluster.add_argument("--key-prefix", default=None, help=argparse.SUPPRESS)
    _loglevel_option(cluster)
    cluster.set_defaults(run=run_cluster)

    status = sub.add_parser("status", help="list live workers")
    broker_options(status)
    status.set_defaults(run=run_status)

    cancel = sub.add_parser("cancel", help="revoke a task: never start it, or stop it running")
    broker_options(cancel)
    cancel.add_argument("task_id", help=_TASK_ID_HELP)
    cancel.add_argument(
        "--grace",
        type=functools.partial(seconds, zero=True),
        default=5.0,
        metavar="S",
        help="seconds between the interrupt and the kill (default: 5)",
    )
    cancel.set_defaults(run=run_cancel)

    purge = sub.add_parser(
        "purge", help="delete the messages waiting on queues; their tasks become REVOKED"
    )
    broker_options(purge)
    purge.add_argument("-Q", "--queues", default=None, help=QUEUES_HELP)
    purge.add_argument("-f", "--force", action="store_true", help="do not ask to confirm")
    purge.set_defaults(run=run_purge)

    inspect = sub.add_parser("inspect", help="show a task's stored state")
    broker_options(inspect)
    inspect.add_argument("task_id", help=_TASK_ID_HELP)
    inspect.set_defaults(run=run_inspect)

    journal = sub.add_parser(
        "log", help="show what workers said about a task (handler output, retries)"
    )
    broker_options(journal)
    journal.add_argument("task_id", help=_TASK_ID_HELP)
    journal.set_defaults(run=run_log)

    run = sub.add_parser(
        "run", help="execute a notebook headless, streaming its output (embedded cluster)"
    )
    run.add_argument("notebook", help="the .ipynb file to run")
    run.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="OUT.ipynb",
        help="where to write the executed notebook (default: NAME.out.ipynb beside it)",
    )
    run.add_argument(
        "-b",
        "--broker",
        default=None,
        help="broker URL (default: $NBTASK_BROKER, else the embedded cluster)",
    )
    run.add_argument(
        "--secret-file",
        default=None,
        help="file holding the workers' signing secret, for a --broker (default: "
        "$NBTASK_SECRET, else the file $NBTASK_SECRET_FILE names)",
    )
    run.add_argument(
        "--timeout",
        type=functools.partial(seconds, zero=False),
        default=600.0,
        metavar="S",
        help="seconds one cell may run, and the background cells still running after the "
        "last cell (default: 600)",
    )
    run.set_defaults(run=run_headless)
    return parser, dict(sub.choices)
