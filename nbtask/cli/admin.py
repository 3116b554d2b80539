"""The commands that look at or act on tasks and workers through a broker, serving none.

``status``, ``inspect`` and ``log`` read the store on a connection of their own;
``cancel`` and ``purge`` act through an :class:`~nbtask.App`, like a client would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from typing import TypeVar

from nbtask._text import printable
from nbtask.brokers import Store, open_broker
from nbtask.cli.options import queue_names, settings_for
from nbtask.client.app import App
from nbtask.client.reattach import journal_of, resolve_task_id
from nbtask.core.holding import is_holder_queue
from nbtask.errors import ConfigurationError, NbtaskError, TaskNotFound
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType, State
from nbtask.wire.holdings import Holdings, holdings_lines
from nbtask.wire.records import TaskRecord, WorkerInfo

__all__ = ["run_cancel", "run_inspect", "run_log", "run_purge", "run_status"]

T = TypeVar("T")


def _read_store(args: argparse.Namespace, read: Callable[[Store], T]) -> T:
    """``read(store)`` on the broker the command names, connected for that read alone."""
    settings = settings_for(args)
    assert settings.broker_url is not None
    transport = open_broker(settings, settings.broker_url)
    try:
        transport.ping()  # a wrong URL is an error, not "no live workers"
        return read(transport.store)
    finally:
        transport.close()


def run_status(args: argparse.Namespace) -> int:
    """``nbtask status``: the live workers, their queues and what they hold."""

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


def _task_id(store: Store, args: argparse.Namespace) -> str:
    """The id of the task the command names: its id, or a unique prefix of it."""
    return resolve_task_id(store, args.task_id, settings_for(args).result_ttl)


def run_inspect(args: argparse.Namespace) -> int:
    """``nbtask inspect TASK_ID``: a task's stored state."""

    def read(store: Store) -> tuple[str, TaskRecord | None]:
        task_id = _task_id(store, args)
        return task_id, store.get_record(task_id)

    try:
        task_id, record = _read_store(args, read)
    except TaskNotFound as exc:
        print(f"nbtask inspect: {exc}", file=sys.stderr)
        return 1
    if record is None:  # expired since
        print(f"nbtask inspect: no task {task_id!r} in the result store", file=sys.stderr)
        return 1
    fields = {
        "id": task_id,
        "name": record.name,
        "state": record.state.value if record.state is not None else "",
        # Where it waits or ran: the queue it was sent to, or its retry, or the move off a
        # gone process's own queue sent it to.
        "queue": record.queue,
        "worker": record.worker,
        "pid": record.pid,
        "started_at": _utc_time(record.started_at),
        "finished_at": _utc_time(record.finished_at),
        "error": _why_it_ended(settings_for(args), record.result),
    }
    for key, value in fields.items():
        if value:
            print(f"{key}: {printable(value)}")
    return 0


def _utc_time(stamp: float | None) -> str:
    """``2026-12-06T10:03:31.590+00:00``: a time in a record (its worker's clock), in UTC."""
    if stamp is None:
        return ""
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="milliseconds")


def _why_it_ended(settings: Settings, result: bytes | None) -> str:
    """A failed task's error (``KeyError: 'k'``), or why it was revoked or lost.

    Read from the header of the signed final event only: nothing is unpickled. A result
    that does not verify (another secret, tampered) says so instead.
    """
    if not result:
        return ""
    try:
        envelope = Signer.for_settings(settings, settings.secret).open(result)
        event = Event.from_header(envelope.header)
    except (NbtaskError, ValueError, TypeError) as exc:  # a malformed header, verified
        return f"(the stored outcome cannot be read: {exc})"
    data = event.data
    if event.type is EventType.FAILURE:
        text = f"{data.get('ename', 'Exception')}: {data.get('evalue', '')}"
    elif event.type in (EventType.REVOKED, EventType.WORKER_LOST):
        text = str(data.get("reason", ""))
    else:
        return ""
    first, *more = text.strip().splitlines() or [""]
    return first + (" ..." if more else "")


def run_log(args: argparse.Namespace) -> int:
    """``nbtask log TASK_ID``: what workers said about a task."""
    ttl = settings_for(args).result_ttl
    try:
        lines = _read_store(args, lambda store: journal_of(store, args.task_id, ttl))
    except TaskNotFound as exc:
        print(f"nbtask log: {exc}", file=sys.stderr)
        return 1
    if not lines:
        print(f"nbtask log: nothing was logged about task {args.task_id!r}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    """``nbtask cancel TASK_ID``: revoke a task, interrupting it if it runs."""
    settings = settings_for(args)
    app = App("nbtask-cli", settings=settings)
    try:
        task_id = _task_id(app.store, args)
        record = app.store.get_record(task_id)
        if record is None:  # expired since
            print(f"nbtask cancel: no task {task_id!r} in the result store", file=sys.stderr)
            return 1
        if app.revoke(task_id, terminate=True, grace=args.grace):
            print(
                f"{task_id}: revoked"
                if record.state is not State.STARTED
                else f"{task_id}: running; interrupt sent (kill after {args.grace:g} s)"
            )
            return 0
        state = record.state.value if record.state is not None else "unknown"
        print(f"nbtask cancel: task {task_id!r} already finished ({state})", file=sys.stderr)
        return 1
    except TaskNotFound as exc:
        print(f"nbtask cancel: {exc}", file=sys.stderr)
        return 1
    finally:
        app.close()


def run_purge(args: argparse.Namespace) -> int:
    """``nbtask purge``: delete the messages waiting on queues, once confirmed."""
    settings = settings_for(args)
    queues = queue_names(args.queues, settings)
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
