"""IPython magics: ``%load_ext nbtask``, ``%%task``, ``%nbtask``, ``%tasks``.

The magics are thin: they parse arguments and call :class:`Session`, which holds this
notebook's app, its cell runs and the hooks that deliver pending names.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display, publish_display_data

from nbtask.app import App
from nbtask.cells import CellError, NamedCell, analyze, cell_runner, prepare
from nbtask.events import FINAL_STATES, Event, EventType
from nbtask.listener import decode_event
from nbtask.pending import WAIT_NAME, CellRun, Pending, WaitInserter, wait_interruptibly
from nbtask.settings import read_secret_file
from nbtask.widgets import TaskView, TaskWidget, cancel_task, follow, make_view

__all__ = ["Session", "TaskMagics", "load_ipython_extension", "unload_ipython_extension"]

F = TypeVar("F")


def _typed(decorator: Any) -> Callable[[F], F]:
    """IPython's decorators are unannotated: keep the decorated function's type."""
    return cast("Callable[[F], F]", decorator)


_SESSIONS: dict[int, Session] = {}  # id(shell) -> its session (one per loaded shell)


class _Result:
    """The last expression of a ``--wait`` cell, shown as the cell's own ``Out``."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        metadata = dict(self.bundle.get("metadata", {}))
        metadata.pop("nbtask", None)
        return dict(self.bundle.get("data", {})), metadata

    def __repr__(self) -> str:
        return str(self.bundle.get("data", {}).get("text/plain", ""))


class Session:
    """One notebook's connection, cell runs and hooks.

    Parameters
    ----------
    shell
        The IPython shell the extension was loaded into.
    app
        Use this app instead of one made from the environment.
    """

    def __init__(self, shell: Any, app: App | None = None) -> None:
        self.shell = shell
        self.owns_app = app is None
        self.app = app if app is not None else App("notebook")
        self.pending = Pending(shell.user_ns)
        self.inserter = WaitInserter(self.pending)
        self.views: dict[str, TaskView] = {}

    # Lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, install the hooks and say where the cells will run."""
        self.app.connect()
        self.shell.push({WAIT_NAME: self.pending.wait}, interactive=False)
        self.shell.ast_transformers.append(self.inserter)
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        print(self.describe())

    def stop(self) -> None:
        """Remove the hooks and close the app if this session made it."""
        if self.inserter in self.shell.ast_transformers:
            self.shell.ast_transformers.remove(self.inserter)
        with contextlib.suppress(ValueError):  # not registered
            self.shell.events.unregister("pre_run_cell", self._pre_run_cell)
        self.shell.user_ns.pop(WAIT_NAME, None)
        self.shell.user_ns_hidden.pop(WAIT_NAME, None)
        if self.owns_app:
            self.app.close()

    def _pre_run_cell(self, *_info: Any) -> None:
        self.pending.harvest()

    def describe(self) -> str:
        """``nbtask: <broker>, <n> worker processes``."""
        if self.app.cluster is not None:
            where = f"embedded cluster ({self.app.cluster.url})"
            count = self.app.settings.embedded_workers
        else:
            where = _redact(self.app.settings.broker_url or "")
            infos = [json.loads(i) for i in self.app.workers().values()]
            count = sum(int(i.get("concurrency") or 1) for i in infos)
        return f"nbtask: {where}, {count} worker process{'es' if count != 1 else ''}"

    def reconnect(self, app: App) -> None:
        """Switch to another app (closing ours) unless cells are still running."""
        if self.pending.running():
            raise CellError("cells are still running; wait for them or cancel them first")
        if self.owns_app:
            self.app.close()
        self.app, self.owns_app = app, True
        self.app.connect()
        print(self.describe())

    # %%task ----------------------------------------------------------------------------------
    def run_cell(self, cell: str, args: Any) -> Any:
        """Check, send and follow one cell; see :meth:`TaskMagics.task`."""
        python = self.shell.transform_cell(cell)
        try:
            found = analyze(python)
        except SyntaxError as exc:
            raise CellError(f"the cell does not parse: {exc}") from None
        self.pending.harvest()
        self.pending.wait([n for n in found.reads if n in self.pending.owner])
        label = args.name or _first_line(cell)
        spec, blob, found = prepare(
            cell,
            python,
            self.shell.user_ns,
            max_bytes=self.app.settings.max_message_bytes,
            filename=f"Cell In[{self.shell.execution_count}]",
            retries=args.retries,
            hidden=self.shell.user_ns_hidden,
            line_offset=1,  # tracebacks count the %%task line, as the notebook numbers lines
        )
        if args.name:
            self.app.cells[args.name] = NamedCell(
                self.app, args.name, cell, python, self.shell.user_ns
            )
        handle = cell_runner(self.app).apply_async(
            (spec, blob), queue=args.queue, expires=args.timeout
        )
        names = tuple(dict.fromkeys([*found.assigned, *found.mutated]))
        run = CellRun(handle, label, names)
        if args.out:
            self.shell.user_ns[args.out] = handle
        if args.wait:
            self.pending.forget(names)
            self.pending.add(run, pending=False)
            return self._wait(run, args.timeout)
        self.pending.add(run)
        view = make_view(handle, label, self.shell)
        run.view = view
        self.views[handle.id] = view
        if isinstance(view, TaskWidget):
            display(view)
        follow(handle, view.apply)
        if args.timeout:
            timer = threading.Timer(args.timeout, cancel_task, (handle,))
            timer.daemon = True
            timer.start()
        return None

    def _wait(self, run: CellRun, timeout: float | None) -> Any:
        """Stream a task's output into this cell as it comes; return its last expression."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        follow(run.handle, events.put)
        line = _ProgressLine(run.label, self.shell)
        result: dict[str, Any] | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    if deadline is not None and time.monotonic() > deadline:
                        cancel_task(run.handle)
                        raise TimeoutError(
                            f"task {run.label!r} did not finish within {timeout} s; cancelled"
                        ) from None
                    continue
                if event.type is EventType.STDOUT:
                    sys.stdout.write(str(event.data.get("text", "")))
                    sys.stdout.flush()
                elif event.type is EventType.STDERR:
                    sys.stderr.write(str(event.data.get("text", "")))
                    sys.stderr.flush()
                elif event.type is EventType.DISPLAY:
                    data = dict(event.data)
                    if data.get("metadata", {}).get("nbtask", {}).get("execute_result"):
                        result = data
                    elif not data.get("clear"):
                        publish_display_data(data.get("data", {}), data.get("metadata", {}))
                elif event.type is EventType.PROGRESS:
                    line.show(event)
                if event.state in FINAL_STATES:
                    break
        except KeyboardInterrupt:
            cancel_task(run.handle)
            raise
        finally:
            line.close()
        wait_interruptibly(run.handle)
        self.pending.deliver(run, raise_errors=True)
        return _Result(result) if result is not None else None

    # %tasks and status -----------------------------------------------------------------------
    def attach(self, task_id: str) -> TaskView:
        """Re-open a task by id (any client's), replaying the output it left."""
        view = self.views.get(task_id)
        if view is not None:
            return view
        handle = self.app.handle(task_id)
        view = make_view(handle, task_id[:8], self.shell)
        if isinstance(view, TaskWidget):
            display(view)
        if handle.done() and not handle.outputs:
            for event in replay(self.app, task_id):
                view.apply(event)
        follow(handle, view.apply)
        self.views[task_id] = view
        return view

    def board(self) -> str:
        """One text line per task of this notebook (newest last)."""
        rows = []
        for run in self.pending.runs:
            view = self.views.get(run.handle.id)
            state = str(run.handle.state)
            progress = view.progress_text() if view else ""
            worker = str(run.handle.info.get("worker", ""))
            elapsed = f"{view.elapsed():.1f} s" if view else ""
            rows.append(
                f"{run.handle.id[:8]}  {run.label[:30]:30}  {state:11} {progress:18} "
                f"{worker:16} {elapsed}"
            )
        return "\n".join(rows) or "no tasks yet"

    def status(self) -> str:
        """Broker, workers (host/pid/queues/concurrency) and running cells."""
        lines = [self.describe()]
        for worker_id, info_text in sorted(self.app.workers().items()):
            info = json.loads(info_text)
            lines.append(
                f"  worker {worker_id}: host {info.get('hostname')} pid {info.get('pid')} "
                f"queues {','.join(info.get('queues', []))} "
                f"concurrency {info.get('concurrency')}"
            )
        running = self.pending.running()
        lines.append(f"  {len(running)} cell(s) pending")
        lines.extend(f"    {r.handle.id[:8]} {r.label} {r.handle.state!s}" for r in running)
        return "\n".join(lines)


class _ProgressLine:
    """A transient progress line under a ``--wait`` cell, gone when the cell ends."""

    def __init__(self, label: str, shell: Any) -> None:
        self.label = label
        self.in_kernel = "IPKernelApp" in getattr(shell, "config", {})
        self.handle: Any = None
        self.last = 0.0

    def show(self, event: Event) -> None:
        now = time.monotonic()
        if now - self.last < 1 / 15:
            return
        self.last = now
        progress = event.progress
        if progress is None:
            return
        total = f"/{progress.total:g}" if progress.total else ""
        text = f"[{self.label}] {progress.done:g}{total} {progress.message}".rstrip()
        if not self.in_kernel:
            sys.stderr.write(text + "\n")
        elif self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)


def replay(app: App, task_id: str) -> list[Event]:
    """The events a task sent to its client's channel, while the channel is kept."""
    record = app.broker.get_record(task_id)
    channel = record.get("client", b"").decode()
    if not channel:
        return []
    found: list[Event] = []
    position = "0-0"
    while True:
        entries = app.broker.read_events({channel: position}, block_seconds=0.001)
        if not entries:
            return found
        for _channel, entry_id, raw in entries:
            position = entry_id
            if not raw:
                continue
            try:
                event, _ = decode_event(app.signer, raw)
            except Exception:
                continue
            if event.task_id == task_id:
                found.append(event)


@_typed(magics_class)
class TaskMagics(Magics):  # type: ignore[misc]
    """``%%task``, ``%nbtask`` and ``%tasks``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    @_typed(magic_arguments())
    @_typed(argument("name", nargs="?", help="register the cell as app.cells[NAME]"))
    @_typed(argument("-q", "--queue", help="send to this queue"))
    @_typed(argument("-w", "--wait", action="store_true", help="block; output streams here"))
    @_typed(argument("-t", "--timeout", type=float, help="cancel the task after S seconds"))
    @_typed(argument("-r", "--retries", type=int, default=0, help="rerun N times on error"))
    @_typed(argument("-o", "--out", metavar="VAR", help="store the TaskHandle in VAR"))
    @_typed(cell_magic)
    def task(self, line: str, cell: str) -> Any:
        """Run this cell on a worker.

        The names the cell reads are shipped; the names it assigns (and shipped values
        it changes in place) come back. Without --wait the cell returns at once with a
        live view, and a later cell reading an assigned name waits for it.
        """
        args = parse_argstring(self.task, line)
        return self.session.run_cell(cell, args)

    @_typed(magic_arguments())
    @_typed(argument("command", choices=["connect", "status", "workers"]))
    @_typed(argument("value", nargs="?", help="broker URL (connect) or process count (workers)"))
    @_typed(argument("--secret-file", help="file holding the signing secret (connect)"))
    @_typed(line_magic)
    def nbtask(self, line: str) -> None:
        """Connect to a broker, show the status, or resize the embedded cluster."""
        args = parse_argstring(self.nbtask, line)
        session = self.session
        if args.command == "status":
            print(session.status())
        elif args.command == "connect":
            if not args.value:
                raise CellError("usage: %nbtask connect URL [--secret-file F]")
            secret = read_secret_file(args.secret_file) if args.secret_file else None
            session.reconnect(App("notebook", broker=args.value, secret=secret))
        else:
            if session.app.cluster is None:
                raise CellError("%nbtask workers N resizes the embedded cluster only")
            count = int(args.value or 0)
            if count < 1:
                raise CellError("usage: %nbtask workers N (N >= 1)")
            session.reconnect(
                App("notebook", settings=session.app.settings, embedded_workers=count)
            )

    @_typed(magic_arguments())
    @_typed(argument("--attach", metavar="ID", help="re-open a task by id, replaying its output"))
    @_typed(line_magic)
    def tasks(self, line: str) -> Any:
        """A board of this notebook's tasks (``--attach ID`` re-opens any task)."""
        args = parse_argstring(self.tasks, line)
        if args.attach:
            view = self.session.attach(args.attach)
            return None if isinstance(view, TaskWidget) else print(view.status_text())
        print(self.session.board())
        return None


def _first_line(cell: str) -> str:
    for text in cell.splitlines():
        if text.strip() and not text.lstrip().startswith("#"):
            return text.strip()[:40]
    return "cell"


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def load_ipython_extension(shell: Any, app: App | None = None) -> None:
    """``%load_ext nbtask``: connect (or start the embedded cluster) and add the magics."""
    if id(shell) in _SESSIONS:
        return
    session = Session(shell, app)
    session.start()
    _SESSIONS[id(shell)] = session
    shell.register_magics(TaskMagics(shell, session))


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext nbtask``: remove the hooks, stop the listener and embedded cluster."""
    session = _SESSIONS.pop(id(shell), None)
    if session is not None:
        session.stop()
        # IPython keeps registered magics after unloading; drop ours so none is left
        # pointing at a closed session.
        for kind, names in (("cell", ["task"]), ("line", ["nbtask", "tasks"])):
            for name in names:
                shell.magics_manager.magics[kind].pop(name, None)


def session_of(shell: Any) -> Session | None:
    """The session loaded into ``shell``, if any."""
    return _SESSIONS.get(id(shell))
