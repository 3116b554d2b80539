"""``nbtask worker`` and ``nbtask cluster``: the two commands that start a worker.

What they share lives here: importing the ``-A`` modules for their tasks, gathering the
datasets of ``--data`` and of those modules' apps, and logging. ``cluster`` also starts
the private Redis server it serves (the embedded cluster a client starts runs this).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TextIO

from nbtask._text import redact_url
from nbtask.brokers.local_blobs import remove_local_blobs
from nbtask.cli.options import queue_names, settings_for
from nbtask.client.app import App
from nbtask.client.embedded import start_redis_server
from nbtask.core.datasets import Loader, load_data_spec
from nbtask.core.named import module_tasks
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError
from nbtask.settings import ENVIRONMENT, Settings
from nbtask.worker import Worker

__all__ = ["data_option", "run_cluster", "run_worker"]

#: The settings a client must share with the cluster's workers, beside the broker and the
#: secret: the key prefix and default queue say where tasks go and records are kept, and
#: a blob directory is where the workers leave large values for the client to read.
_SHARED_WITH_CLIENTS = ("key_prefix", "default_queue", "blob_dir")


def _import_tasks(specs: Sequence[str]) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    sys.path.insert(0, os.getcwd())
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        module, attr = _import_module(spec, module_name, attr)
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


def _import_module(spec: str, module_name: str, attr: str) -> tuple[ModuleType, str]:
    """The module an ``-A`` option names, and the attribute of it that it names, if any.

    As with Celery's ``-A``, ``proj.tasks.app`` names ``app`` in ``proj.tasks`` when there
    is no module ``proj.tasks.app``.
    """
    try:
        return importlib.import_module(module_name), attr
    except Exception as exc:
        failed = exc
    parent, _, leaf = module_name.rpartition(".")
    if isinstance(failed, ModuleNotFoundError) and failed.name == module_name and parent:
        # The parent imported (else it would be the one missing), unless it raised.
        with contextlib.suppress(Exception):
            module = importlib.import_module(parent)
            if not attr and hasattr(module, leaf):
                return module, leaf
    raise ConfigurationError(
        f"-A {spec}: cannot import {module_name!r}: {type(failed).__name__}: {failed}"
    ) from None


def _apps_in(module: ModuleType | None) -> list[App]:
    """The apps a module (imported by ``-A``) defines at its top level."""
    return [v for v in vars(module).values() if isinstance(v, App)] if module else []


def _tasks_of(spec: str, source: object) -> dict[str, Task]:
    """The tasks an ``-A`` option names: a module's, an app's (``.tasks``), or one task."""
    if isinstance(source, Task):
        return {source.name: source}
    found = getattr(source, "tasks", None)
    if isinstance(source, ModuleType):
        values = module_tasks(source)  # with app.register_task(AddTask()) instances
    elif isinstance(found, dict):
        values = list(found.values())
    else:
        raise ConfigurationError(
            f"-A {spec}: {spec.partition(':')[2]!r} is a {type(source).__name__}, not a "
            "module, an App or a task; use -A MODULE, MODULE:app or MODULE:task"
        )
    return {v.name: v for v in values if isinstance(v, Task) and not type(v).is_abstract()}


def data_option(parser: argparse.ArgumentParser) -> None:
    """The ``--data NAME=MODULE:FUNCTION`` option of ``worker`` and ``cluster``."""
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
        module_name = spec.partition(":")[0]
        # -A proj.tasks.app names proj.tasks (see _import_module).
        module = sys.modules.get(module_name) or sys.modules.get(module_name.rpartition(".")[0])
        for app in _apps_in(module):
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


def _app_of(specs: Sequence[str]) -> App | None:
    """The App the ``-A`` modules define (or name, ``-A module:app``), if any.

    Several that send to different places (broker, key prefix) are refused: which one the
    worker serves would be a guess.
    """
    apps: dict[int, App] = {}
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        module = sys.modules.get(module_name) or sys.modules.get(module_name.rpartition(".")[0])
        named = getattr(module, attr or module_name.rpartition(".")[2], None)
        found = [named] if isinstance(named, App) else _apps_in(module)
        apps.update((id(app), app) for app in found)
    places = {(a.settings.broker_url, a.settings.key_prefix): a for a in apps.values()}
    if len(places) > 1:
        shown = ", ".join(
            f"{a.name!r} ({redact_url(url or 'no broker')}, key prefix {prefix!r})"
            for (url, prefix), a in places.items()
        )
        raise ConfigurationError(
            f"-A: the modules define Apps that send to different places: {shown}; name one "
            "with -A MODULE:app, or give -b URL and --key-prefix"
        )
    return next(iter(places.values()), None)


def run_worker(args: argparse.Namespace) -> int:
    """``nbtask worker``: serve the queues of a broker until stopped.

    The settings: the options, over those of the App the ``-A`` modules define (as with
    Celery's ``-A``), over the ``NBTASK_*`` environment (see :func:`settings_for`).
    """
    tasks = _import_tasks(args.app)
    app = _app_of(args.app)
    settings = settings_for(args, app.settings if app is not None else None)
    _logging(args.loglevel)
    _say_whose_broker(args, settings, app)
    queues = queue_names(args.queues, settings)
    assert settings.broker_url is not None
    worker = Worker(
        settings,
        settings.broker_url,
        settings.secret,
        queues=queues,
        concurrency=args.concurrency,
        tasks=tasks,
        datasets=_datasets(args),
        on_notebook=_ready_for_cells,
    )
    worker.connect()  # the banner says a worker is serving: not before it can
    print(worker.banner(), flush=True)
    return worker.run()


def _say_whose_broker(args: argparse.Namespace, settings: Settings, app: App | None) -> None:
    """Log the one line saying which broker won when the App's and the environment's differ."""
    from_env = os.environ.get(ENVIRONMENT["broker_url"])
    if app is None or not from_env or from_env == app.settings.broker_url:
        return
    used = "-b" if args.broker is not None else f"the -A App {app.name!r}'s broker="
    logging.getLogger("nbtask.worker").warning(
        "serving %s (%s), not %s=%s: -b wins over the App's settings, which win over "
        "NBTASK_* variables, as when the App sends",
        redact_url(settings.broker_url or ""),
        used,
        ENVIRONMENT["broker_url"],
        redact_url(from_env),
    )


def run_cluster(args: argparse.Namespace) -> int:
    """``nbtask cluster``: a private Redis server and a worker serving it, until stopped."""
    settings = settings_for(args)
    _logging(args.loglevel)
    ready = _ready_line_stream() if args.embedded else None
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
            # As the cluster a notebook starts: NBTASK_WORKERS unless -c says otherwise.
            concurrency=args.concurrency or settings.embedded_workers,
            tasks=tasks,
            datasets=datasets,
            parent_pid=args.parent_pid,
            on_ready=functools.partial(_announce_embedded, ready) if ready else None,
            on_notebook=_ready_for_cells,
        )
        if not args.embedded:
            print(worker.banner(), flush=True)
            exports = "".join(
                f"  export {line}\n" for line in _client_exports(settings, url, secret)
            )
            print(f"\nConnect a client with:\n{exports}", flush=True)
        return worker.run()
    finally:
        redis_process.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            redis_process.wait(5)
        if args.embedded or not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
            remove_local_blobs(url)


def _client_exports(settings: Settings, url: str, secret: str) -> list[str]:
    """``NAME=value`` for each variable a client needs to reach this cluster's workers.

    The broker and secret, and every setting of :data:`_SHARED_WITH_CLIENTS` the cluster
    runs with that is not the default: a client with another key prefix or default queue
    sends where no worker looks, and its task waits for ever.
    """
    given = {"broker_url": url, "secret": secret}
    defaults = Settings()
    for field in _SHARED_WITH_CLIENTS:
        value = getattr(settings, field)
        if value != getattr(defaults, field):
            given[field] = value
    env = Settings.from_mapping(given).to_env()
    return [f"{ENVIRONMENT[field]}={shlex.quote(env[ENVIRONMENT[field]])}" for field in given]


def _ready_for_cells(modules: list[str]) -> None:
    """In a worker child, once a notebook session uses the worker: see ``notebook/warmup.py``."""
    from nbtask.notebook.warmup import warm  # noqa: PLC0415 - only then: it loads IPython

    warm(modules)


def _ready_line_stream() -> TextIO:
    """Where an embedded cluster's one ``READY`` line goes: the pipe its client reads.

    The client closes that pipe once it has the line, so everything else written to
    stdout, by this process and by the worker processes it starts (a task's
    ``os.system``, a subprocess it runs), goes to the cluster's log (stderr) instead: on a
    closed pipe such a write would fail with a broken pipe, and on an unread one block.
    """
    sys.stdout.flush()
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return ready


def _announce_embedded(ready: TextIO, worker: Worker) -> None:
    ready.write(f"READY {worker.url}\n")
    ready.close()
