"""The ``nbtask`` command (also ``python -m nbtask``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from nbtask._text import printable
from nbtask._version import __version__
from nbtask.brokers import Store, open_broker
from nbtask.brokers.local_blobs import remove_local_blobs
from nbtask.client.app import App
from nbtask.client.embedded import start_redis_server
from nbtask.core.datasets import Loader, data_queue, load_data_spec
from nbtask.core.holding import holder_queue, is_holder_queue
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError, NbtaskError, NotebookFailed
from nbtask.settings import MAX_SECONDS, Settings, read_secret_file
from nbtask.wire.events import State
from nbtask.wire.holdings import Holdings, holdings_lines
from nbtask.wire.records import WorkerInfo
from nbtask.worker import Worker

__all__ = ["main"]

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nbtask`` command line; return the exit code."""
    parser, commands = _parser()
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
    args = parser.parse_args(words)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.run(args)
    except NbtaskError as exc:
        print(f"nbtask {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> tuple[argparse.ArgumentParser, Sequence[str]]:
    """The parser, and the names of its commands."""
    parser = argparse.ArgumentParser(
        prog="nbtask", description="Run nbtask workers and inspect tasks."
    )
    parser.add_argument("--version", action="version", version=f"nbtask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    worker = sub.add_parser("worker", help="serve tasks from a broker")
    _broker_options(worker)
    worker.add_argument(
        "-Q", "--queues", default=None, help="comma-separated queues (default: default)"
    )
    worker.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=None,
        help="child processes (default: one per CPU core)",
    )
    worker.add_argument(
        "-A",
        "--app",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE[:attr] and register the tasks it defines (repeatable)",
    )
    _data_option(worker)
    worker.add_argument(
        "--loglevel", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    worker.set_defaults(run=_run_worker)

    cluster = sub.add_parser(
        "cluster", help="run a private Redis and workers in the foreground (the embedded cluster)"
    )
    cluster.add_argument("-c", "--concurrency", type=_positive_int, default=2)
    cluster.add_argument("-A", "--app", action="append", default=[], metavar="MODULE")
    _data_option(cluster)
    cluster.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    cluster.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    cluster.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    cluster.add_argument("--key-prefix", default=None, help=argparse.SUPPRESS)
    cluster.add_argument(
        "--loglevel", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    cluster.set_defaults(run=_run_cluster)

    status = sub.add_parser("status", help="list live workers")
    _broker_options(status)
    status.set_defaults(run=_run_status)

    cancel = sub.add_parser("cancel", help="revoke a task: never start it, or stop it running")
    _broker_options(cancel)
    cancel.add_argument("task_id")
    cancel.add_argument(
        "--grace",
        type=functools.partial(_seconds, zero=True),
        default=5.0,
        metavar="S",
        help="seconds between the interrupt and the kill (default: 5)",
    )
    cancel.set_defaults(run=_run_cancel)

    purge = sub.add_parser(
        "purge", help="delete the messages waiting on queues; their tasks become REVOKED"
    )
    _broker_options(purge)
    purge.add_argument(
        "-Q", "--queues", default=None, help="comma-separated queues (default: default)"
    )
    purge.add_argument("-f", "--force", action="store_true", help="do not ask to confirm")
    purge.set_defaults(run=_run_purge)

    inspect = sub.add_parser("inspect", help="show a task's stored state")
    _broker_options(inspect)
    inspect.add_argument("task_id")
    inspect.set_defaults(run=_run_inspect)

    journal = sub.add_parser(
        "log", help="show what workers said about a task (handler output, retries)"
    )
    _broker_options(journal)
    journal.add_argument("task_id")
    journal.set_defaults(run=_run_log)

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
        "--timeout",
        type=functools.partial(_seconds, zero=False),
        default=600.0,
        metavar="S",
        help="seconds one cell may run (default: 600)",
    )
    run.set_defaults(run=_run_notebook)
    return parser, tuple(sub.choices)


def _broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-b", "--broker", default=None, help="broker URL (default: $NBTASK_BROKER)")
    parser.add_argument(
        "--secret-file",
        default=None,
        help="file holding the signing secret (default: $NBTASK_SECRET)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept no secret (anyone with broker access can run code)",
    )
    parser.add_argument("--key-prefix", default=None, help="key prefix (default: nbtask)")


def _queue_names(text: str | None, settings: Settings) -> list[str]:
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


def _seconds(text: str, *, zero: bool) -> float:
    """A number of seconds for an option: finite, not negative, and not 0 unless ``zero``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value <= MAX_SECONDS) or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({least})")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _settings(args: argparse.Namespace) -> Settings:
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
    settings = Settings.from_env(None, **overrides)
    if args.command == "run" and settings.broker_url is None:
        return settings  # the embedded cluster, like ``cluster``
    if args.command != "cluster":
        if settings.broker_url is None:
            raise ConfigurationError("no broker: pass -b URL or set NBTASK_BROKER")
        if not (settings.secret or settings.insecure):
            how = (
                "set NBTASK_SECRET or NBTASK_SECRET_FILE (the workers' secret), or "
                "NBTASK_INSECURE=1"
                if args.command == "run"
                else "set NBTASK_SECRET or pass --secret-file FILE (the same secret as the "
                "clients'), or --insecure"
            )
            raise ConfigurationError(f"no secret: {how}")
    return settings


def _import_tasks(specs: Sequence[str]) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    sys.path.insert(0, os.getcwd())
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigurationError(
                f"-A {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
            ) from None
        if attr and not hasattr(module, attr):
            raise ConfigurationError(f"-A {spec}: module {module_name!r} has no {attr!r}")
        found = _tasks_of(spec, getattr(module, attr) if attr else module)
        if not found and not any(app.datasets for app in _apps_in(module)):
            raise ConfigurationError(
                f"-A {spec}: found no nbtask task (nor an App declaring a dataset) there; name "
                "the module that defines them, e.g. -A proj.tasks or -A proj.tasks:app"
            )
        tasks.update(found)
    return tasks


def _apps_in(module: ModuleType | None) -> list[App]:
    """The apps a module (imported by ``-A``) defines at its top level."""
    return [v for v in vars(module).values() if isinstance(v, App)] if module else []


def _tasks_of(spec: str, source: object) -> dict[str, Task]:
    """The tasks an ``-A`` option names: a module's, an app's (``.tasks``), or one task."""
    if isinstance(source, Task):
        return {source.name: source}
    found = getattr(source, "tasks", None)
    if isinstance(source, ModuleType):
        values = list(vars(source).values())
    elif isinstance(found, dict):
        values = list(found.values())
    else:
        raise ConfigurationError(
            f"-A {spec}: {spec.partition(':')[2]!r} is a {type(source).__name__}, not a "
            "module, an App or a task; use -A MODULE, MODULE:app or MODULE:task"
        )
    return {v.name: v for v in values if isinstance(v, Task) and not type(v).is_abstract()}


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=MODULE:FUNCTION",
        help="hold the named dataset FUNCTION() makes, loaded once per process (repeatable)",
    )


def _datasets(args: argparse.Namespace) -> dict[str, Loader]:
    """The datasets of ``--data`` options and of the apps in the ``-A`` modules."""
    found: dict[str, Loader] = {}
    for spec in args.app:
        for app in _apps_in(sys.modules.get(spec.partition(":")[0])):
            found.update(app.datasets)
    given = [load_data_spec(spec) for spec in args.data]
    names = [name for name, _ in given]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigurationError(
            f"--data {twice[0]}=... is given more than once: give each dataset name once"
        )
    found.update(given)
    return found


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="[%(asctime)s %(levelname)s %(processName)s] %(message)s",
        stream=sys.stderr,
    )


def _run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(args.loglevel)
    queues = _queue_names(args.queues, settings)
    assert settings.broker_url is not None
    worker = Worker(
        settings,
        settings.broker_url,
        settings.secret,
        queues=queues,
        concurrency=args.concurrency,
        tasks=_import_tasks(args.app),
        datasets=_datasets(args),
    )
    worker.connect()  # the banner says a worker is serving: not before it can
    print(worker.banner(), flush=True)
    return worker.run()


def _run_cluster(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(args.loglevel)
    secret = settings.secret or secrets.token_hex(32)
    # Options are checked before the server starts: a bad one leaves nothing behind.
    tasks, datasets = _import_tasks(args.app), _datasets(args)
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="nbtask-"))
    redis_process, url = start_redis_server(directory)
    try:
        worker = Worker(
            settings,
            url,
            secret,
            concurrency=args.concurrency,
            tasks=tasks,
            datasets=datasets,
            parent_pid=args.parent_pid,
            on_ready=_announce_embedded if args.embedded else None,
        )
        if not args.embedded:
            print(worker.banner(), flush=True)
            print(
                f"\nConnect a client with:\n  export NBTASK_BROKER={url}\n"
                f"  export NBTASK_SECRET={secret}\n",
                flush=True,
            )
        return worker.run()
    finally:
        redis_process.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            redis_process.wait(5)
        if args.embedded or not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
            remove_local_blobs(url)


def _announce_embedded(worker: Worker) -> None:
    # The client waits for this one line; after it, stdout goes nowhere so a full pipe
    # can never block the worker.
    print(f"READY {worker.url}", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


T = TypeVar("T")


def _read_store(args: argparse.Namespace, read: Callable[[Store], T]) -> T:
    """``read(store)`` on the broker the command names, connected for that read alone."""
    settings = _settings(args)
    assert settings.broker_url is not None
    transport = open_broker(settings, settings.broker_url)
    try:
        transport.ping()  # a wrong URL is an error, not "no live workers"
        return read(transport.store)
    finally:
        transport.close()


def _run_status(args: argparse.Namespace) -> int:
    def read(store: Store) -> tuple[dict[str, WorkerInfo], dict[str, Holdings]]:
        workers = store.workers()
        return workers, store.holdings([c for i in workers.values() for c in i.consumers])

    workers, holdings = _read_store(args, read)
    if not workers:
        print("no live workers")
    for worker_id, info in sorted(workers.items()):
        queues = [q for q in info.queues if not is_holder_queue(q)]
        print(
            f"{printable(worker_id)}: pid {info.pid} queues {printable(','.join(queues))} "
            f"concurrency {info.concurrency} busy {len(info.busy)}"
            + (f" datasets {printable(','.join(info.datasets))}" if info.datasets else "")
        )
        for line in holdings_lines(info, holdings):
            print(line)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    record = _read_store(args, lambda store: store.get_record(args.task_id))
    if record is None:
        print(f"nbtask inspect: no task {args.task_id!r} in the result store", file=sys.stderr)
        return 1
    fields = {
        "name": record.name,
        "state": record.state.value if record.state is not None else "",
        "worker": record.worker,
        "pid": record.pid,
        "started_at": "" if record.started_at is None else repr(record.started_at),
        "finished_at": "" if record.finished_at is None else repr(record.finished_at),
    }
    for key, value in fields.items():
        if value:
            print(f"{key}: {printable(value)}")
    return 0


def _run_log(args: argparse.Namespace) -> int:
    lines = _read_store(args, lambda store: store.read_journal(args.task_id))
    if not lines:
        print(f"nbtask log: nothing was logged about task {args.task_id!r}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _run_cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)
    app = App("nbtask-cli", settings=settings)
    try:
        record = app.store.get_record(args.task_id)
        if record is None:
            print(f"nbtask cancel: no task {args.task_id!r} in the result store", file=sys.stderr)
            return 1
        if app.revoke(args.task_id, terminate=True, grace=args.grace):
            print(
                f"{args.task_id}: revoked"
                if record.state is not State.STARTED
                else f"{args.task_id}: running; interrupt sent (kill after {args.grace:g} s)"
            )
            return 0
        state = record.state.value if record.state is not None else "unknown"
        print(f"nbtask cancel: task {args.task_id!r} already finished ({state})", file=sys.stderr)
        return 1
    finally:
        app.close()


def _run_purge(args: argparse.Namespace) -> int:
    settings = _settings(args)
    queues = _queue_names(args.queues, settings)
    if not args.force:
        try:
            answer = input(f"Delete every message waiting on {', '.join(queues)}? [y/N] ")
        except EOFError:  # no terminal to ask (a script, cron): nothing is purged
            print(file=sys.stderr)
            raise ConfigurationError("no answer to confirm with: pass -f to purge") from None
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged", file=sys.stderr)
            return 1
    app = App("nbtask-cli", settings=settings)
    try:
        purged = app.purge(queues)
    finally:
        app.close()
    print(f"purged {len(purged)} task(s) from {', '.join(queues)}")
    return 0


def _run_notebook(args: argparse.Namespace) -> int:
    # nbclient and the kernel machinery load only for this command.
    from nbtask.notebook.headless import run_notebook  # noqa: PLC0415 - heavy

    _settings(args)  # a bad broker URL or a missing secret, said before any kernel starts
    if args.output is not None:
        _check_output(args.output)
    try:
        run_notebook(args.notebook, args.output, broker=args.broker, timeout=args.timeout)
    except NotebookFailed as exc:
        print(f"nbtask run: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_output(text: str) -> None:
    """Refuse an ``-o`` the executed notebook could not be written to, before it runs."""
    path = Path(text)
    if not text.strip() or path.is_dir():
        raise ConfigurationError(f"-o {text!r} is not a file name: give one, e.g. -o out.ipynb")
    if not path.parent.is_dir():
        raise ConfigurationError(f"-o {text}: there is no folder {path.parent}")
