"""One notebook's session: its app, its cell runs and the hooks that deliver pending names.

What it shows of its tasks (re-opened ones, the ``%tasks`` board, status and log) is
:class:`~nbtask.notebook.overview.TaskOverview`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from nbtask._process import interrupts_held
from nbtask.client.app import App
from nbtask.client.default import default_app, use_as_default
from nbtask.core.handle import TaskHandle
from nbtask.core.holding import naming_interval, session_namer
from nbtask.core.placement import Moving, holder_queue_for
from nbtask.errors import CellError, TaskRevoked, WorkerLost
from nbtask.notebook import process_state
from nbtask.notebook.board import TaskBoard, notebook_group
from nbtask.notebook.carried import carried_names
from nbtask.notebook.cell_handle import CellHandle, reattached_cell
from nbtask.notebook.cell_run import CellRun
from nbtask.notebook.cell_source import CellSyntaxCheck, cell_filename, keep_cell_source
from nbtask.notebook.celltask import NamedCell, cell_task
from nbtask.notebook.fetchbar import fetch_progress
from nbtask.notebook.fingerprints import fingerprints
from nbtask.notebook.follow import (
    Stopping,
    StopPresses,
    cancel_task,
    follow,
    stop_presses,
)
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.overview import TaskOverview
from nbtask.notebook.own_lines import OwnLines
from nbtask.notebook.pending import Pending
from nbtask.notebook.releases import Releases, ReleaseTask
from nbtask.notebook.remote_errors import WorkerErrorDebugger, WorkerSyntaxErrors
from nbtask.notebook.shipping import analyzed, prepare, transformed
from nbtask.notebook.textchunks import note_latest_request
from nbtask.notebook.version_warnings import VersionWarnings, modules_used
from nbtask.notebook.wait_inserter import WAIT_NAME, WaitInserter
from nbtask.notebook.waitline import follow_to_the_end, out_value, show_after_out
from nbtask.notebook.widgets import TaskView, TaskWidget, make_view
from nbtask.wire.blobs import ByteProgress
from nbtask.wire.events import State

__all__ = ["Session"]

_SESSION_ENDED = "when its nbtask session ended (%unload_ext nbtask, or the kernel shut down)"
_RECONNECTED = "when the notebook connected to another broker (%nbtask connect)"
_RESIZED = "when the embedded cluster was started anew to resize it (%nbtask workers N)"
#: How a task Stop interrupted (or killed) ends when its code did not handle the interrupt.
_STOPPED = frozenset({State.REVOKED, State.WORKER_LOST})
#: How long an ending session waits for the cells it cancels to end.
_CANCEL_SECONDS = 10.0
#: A session says it uses the workers for this long, again every third of it (warmup.py).
_NOTEBOOK_SECONDS = 30


class Session(TaskOverview):
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
        self.app = app if app is not None else default_app()
        self.app.fetch_watch = self._watch_fetch
        self.app.reattached = self._reattached
        #: The kernel's process-wide state each cell ships (the environment as changed
        #: since nbtask was loaded), pickled again only when it changed.
        self.kernel_state = process_state.KernelState(shell)
        self.pending = Pending(
            shell.user_ns, on_kept=self._bind_kept, apply_state=self.kernel_state.apply_changes
        )
        # Lambdas: %nbtask connect may replace the app.
        self.releases = Releases(
            self._send_release,
            lambda: self.app.workers(),  # noqa: PLW0108
            lambda released: self.app.store.release_blobs(released),  # noqa: PLW0108
            self.pending.unwritten,
        )
        self.inserter = WaitInserter(self.pending)
        self.syntax_check = CellSyntaxCheck(self.shell, transformed)
        self.debugger = WorkerErrorDebugger(self.shell)
        self.syntax_errors = WorkerSyntaxErrors(self.shell)
        self.views: dict[str, TaskView] = {}
        self.attached: dict[str, str] = {}  # task id -> label, for tasks re-opened by id
        self.boards: list[TaskBoard] = []
        #: Names this notebook's clients on the broker, across kernel restarts.
        self.group = notebook_group()
        self.version_warnings = VersionWarnings()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._own_lines = OwnLines()  # nbtask's own warnings, as its other lines look

    # Lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, install the hooks and say where the cells will run."""
        self.app.connect()
        self.app.store.recent_tasks(self.group, self.app.channel, 0)  # found after a restart
        self._note_notebook()
        self.shell.push({WAIT_NAME: self.pending.wait}, interactive=False)
        self.shell.ast_transformers.append(self.inserter)
        self.shell.input_transformer_manager.line_transforms.insert(0, self.syntax_check)
        self.debugger.install()
        self.syntax_errors.install()
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self._own_lines.add()
        self._ticker = threading.Thread(target=self._tick, name="nbtask-ticker", daemon=True)
        self._ticker.start()
        # A kernel shutting down unloads no extension: its session ends at exit, before
        # the app closes (atexit runs the later registration first).
        atexit.register(self._exit)
        print(self.describe())

    def _exit(self) -> None:
        """The kernel ends (shut down, or restarted gracefully as JupyterLab's Restart does).

        Its background cells run on, as after a kernel killed: a restarted kernel finds
        them with ``%tasks --all``. The kept values they read stay kept for them.
        """
        self.stop(cancel=False)

    def stop(self, *, cancel: bool = True) -> None:
        """End the session: its running cells are cancelled, what it kept is released.

        Removes the hooks and closes the app if this session made it. Without ``cancel``
        running cells are left to run, and the kept values they read stay kept for them.
        """
        atexit.unregister(self._exit)
        if self._stop.is_set():
            return
        if self.inserter in self.shell.ast_transformers:
            self.shell.ast_transformers.remove(self.inserter)
        with contextlib.suppress(ValueError):  # not added
            self.shell.input_transformer_manager.line_transforms.remove(self.syntax_check)
        self.debugger.remove()
        self.syntax_errors.remove()
        with contextlib.suppress(ValueError):  # not registered
            self.shell.events.unregister("pre_run_cell", self._pre_run_cell)
        self._own_lines.remove()
        self.shell.user_ns.pop(WAIT_NAME, None)
        self.shell.user_ns_hidden.pop(WAIT_NAME, None)
        if self.app.fetch_watch == self._watch_fetch:  # an app that outlives the session
            self.app.fetch_watch = None
        if self.app.reattached == self._reattached:
            self.app.reattached = None
        self._stop.set()
        for timer in self._timers:
            timer.cancel()
        if self._ticker is not None:
            self._ticker.join(5)
        with contextlib.suppress(Exception):  # the broker may be gone: the TTL still holds
            # Results of cells still running would reach no one: those that end meanwhile
            # are delivered, so the values they kept are released with the rest.
            if cancel:
                self.pending.cancel_running(timeout=_CANCEL_SECONDS)
            self.pending.harvest()
            self.releases.release_all(_SESSION_ENDED, sparing_running=not cancel)
        if self.owns_app:
            self.app.close()

    def _tick(self) -> None:
        """Twice a second: elapsed times of running tasks, and the ``%tasks`` boards.

        It also renews the session's note that it uses the workers (:mod:`.warmup`), and
        its marks that it names its kept values (:meth:`_mark_named`).

        One thread, so views are not repainted only when an event arrives; it never
        prints (output from a thread lands in whichever cell runs now).
        """
        noted, named = time.monotonic(), float("-inf")
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):
                self.releases.flush()
            with contextlib.suppress(Exception):  # tried again at the next tick
                named = self._mark_named(named)
            if time.monotonic() - noted > _NOTEBOOK_SECONDS / 3:
                noted = time.monotonic()
                with contextlib.suppress(Exception):
                    self._note_notebook()
            for view in list(self.views.values()):
                with contextlib.suppress(Exception):
                    view.tick()
            for board in list(self.boards):
                with contextlib.suppress(Exception):
                    board.refresh()

    def _pre_run_cell(self, *_info: Any) -> None:
        note_latest_request(self.shell)  # what a view's end is sent as a reply to
        self.pending.harvest()

    def reconnect(self, app: App, *, resize: bool = False) -> None:
        """Switch to another app (``resize``: the embedded cluster anew) unless cells run."""
        if self.pending.running():
            raise CellError("cells are still running; wait for them or cancel them first")
        try:  # the new broker first: one that cannot be reached leaves the notebook as it was
            app.connect()
            app.store.recent_tasks(self.group, app.channel, 0)
        except BaseException:
            app.close()
            raise
        # What this notebook kept lives in the old store, where the new workers cannot
        # read it: released there now, rather than left until result_ttl.
        moved = _store_of(app) != _store_of(self.app)
        if moved:
            with contextlib.suppress(Exception):  # the old broker may be gone: TTLs hold
                self.releases.release_all(_RESIZED if resize else _RECONNECTED)
        if self.owns_app:
            self.app.close()
        self.app, self.owns_app = app, True
        self.app.fetch_watch = self._watch_fetch
        self.app.reattached = self._reattached
        for value in self.releases.values():  # the same store: fetched through the new app
            self._bind(value)
        use_as_default(app)
        with contextlib.suppress(Exception):  # renewed by the ticker
            self._note_notebook()
        print(self.describe())

    def _bind_kept(self, value: RemoteValue) -> None:
        """Let a kept value that reached the notebook be fetched, and released when it goes."""
        self._bind(value)
        self.releases.track(value)

    def _bind(self, value: RemoteValue) -> None:
        value.bind(
            self.app.store.get_blob,
            self.app.settings.fetch_budget,
            self._watch_fetch,
            signer=self.app.signer,
            names=self.pending.names_of,
        )

    def _reattached(self, handle: TaskHandle) -> TaskHandle:
        """``app.handle(id)`` of a cell's task: its cell handle (see :func:`reattached_cell`)."""
        return reattached_cell(handle, self.pending)

    def _watch_fetch(self, label: str, total: int) -> AbstractContextManager[ByteProgress]:
        """A bar for a fetch of ``keep_threshold`` bytes or more (see ``fetchbar.py``)."""
        threshold = self.app.settings.keep_threshold
        return fetch_progress(label, total, threshold=threshold, shell=self.shell)

    def _send_release(self, holder: str, keys: list[str]) -> None:
        release = self.app.tasks.get(ReleaseTask.name)
        if not isinstance(release, ReleaseTask):
            release = self.app.register_task(ReleaseTask())
        release.apply_async((keys,), queue=holder)

    def _mark_named(self, renewed: float) -> float:
        """Mark in the store, for ``result_ttl``, that this live session names its kept values.

        The values tracked since the last tick at once; every ``naming_interval`` (since
        ``renewed``), all of them and the session itself, for what its cells keep before
        their values reach the notebook. Holders drop what no live session marks
        (:mod:`nbtask.core.holding`). Returns when all were last marked.
        """
        settings = self.app.settings
        every = time.monotonic() - renewed >= naming_interval(settings.result_ttl)
        namers = self.releases.namers(every=every)
        if every:
            namers.append(session_namer(self.app.channel))
        if namers:
            self.app.store.mark_named(namers, settings.result_ttl)
        return time.monotonic() if every else renewed

    def _note_notebook(self) -> None:
        """Tell the workers a notebook uses them: each makes ready for cells (warmup.py)."""
        modules = process_state.imported_state_modules()
        self.app.store.note_notebook(modules, _NOTEBOOK_SECONDS)

    # %%task ----------------------------------------------------------------------------------
    def submit_cell(self, cell: str, args: Any) -> Any:
        """Check, send and follow one cell; see :meth:`TaskMagics.task`."""
        python = transformed(self.shell, cell)
        filename = cell_filename(self.shell)
        # The %%task line is the cell's first. Its lines are kept first: a SyntaxError
        # shows its line, as for a cell of the notebook.
        keep_cell_source(self.shell, filename, python, line_offset=1)
        found = analyzed(python, 1, filename, self.shell.compile.ast_parse)
        self.pending.harvest()
        waited = self.pending.awaited(found.reads)
        self.pending.wait(waited, stay=waited)  # kept values are used where they are
        _refuse_names_not_assigned(args, {*found.assigned, *found.mutated})
        label = args.name or _first_line(cell)
        spec, blob, found = prepare(
            cell,
            python,
            self.shell.user_ns,
            filename=filename,
            retries=args.retries,
            # The shell's own names, and the datasets the worker provides, are not shipped.
            hidden={*self.shell.user_ns_hidden, *args.requires},
            line_offset=1,  # tracebacks count the %%task line, as the notebook numbers lines
            state=self.kernel_state.pickled(),
            found=found,
            keep_threshold=self.app.settings.keep_threshold,
            keep=tuple(args.keep),
            fetch=tuple(args.fetch),
            # A waited-for cell's last expression is its Out here: its value comes back.
            shows=f"_{self.shell.execution_count}" if args.wait else "",
        )
        if args.name:
            self.app.cells[args.name] = NamedCell(
                self.app, args.name, cell, python, self.shell.user_ns
            )
        shipped = [self.shell.user_ns.get(n) for n in spec.names]
        # --queue, else the routes by the cell's name, else where the kept values it reads
        # are held unless that process is busy and moving them beats waiting (then by
        # nbtask.cell, as any cell).
        queue = (
            args.queue
            or (self.app.route(args.name) if args.name else None)
            or holder_queue_for(
                shipped, self.app.workers, args.requires, functools.partial(self._moving, args)
            )
        )
        # Stop while its values are hashed and sent stops the sending.
        handle = cell_task(self.app).apply_async(
            (spec, blob),
            queue=queue,
            expires=args.timeout,
            requires=tuple(args.requires) or None,
            label=label,
        )
        # Once sent, the cell must follow the task or cancel it: Stop is counted from here
        # on for a --wait cell (which cancels it), held back until a background cell is
        # tracked (which goes on running).
        with contextlib.ExitStack() as steps:
            presses = steps.enter_context(stop_presses()) if args.wait else StopPresses()
            if not args.wait:
                steps.enter_context(interrupts_held())
            self.releases.hold(handle, shipped)  # the kept values it reads, until it ends
            used = modules_used(found.imports, shipped)
            self.version_warnings.check(self.app, used, handle.queue)
            # And the values its functions carry, which it may change through them.
            carried = carried_names(dict(zip(spec.names, shipped, strict=True)), self.shell.user_ns)
            # And the notebook's objects it reaches inside the values it reads (``l`` of
            # ``l = d["a"]``, changed by ``d["a"].append(3)``).
            changes = [*found.assigned, *found.mutated, *carried, *spec.inside]
            names = tuple(dict.fromkeys(changes))
            # What the notebook may change while a background cell runs, as it was sent.
            sent_names = [*spec.names, *carried, *spec.inside]
            prints = {} if args.wait else fingerprints(self.shell.user_ns, sent_names)
            # The notebook's objects it was sent (a name it binds to one is bound to it) are
            # held by the run alone, which lets them go before its values are written: whether
            # other holders of a value it changes are left with the old object is told by
            # its reference count (nbtask.notebook.inplace).
            run = CellRun(
                handle,
                label,
                names,
                rebound=frozenset(found.assigned),
                state=spec.state,
                sent=_by_value(spec.names, shipped),
                cell=self.shell.execution_count,
                prints=prints,
            )
            del shipped
            self.pending.say_if_random_repeats(run, python)
            if args.out:  # its result is the cell's values, not what the worker sent
                self.shell.user_ns[args.out] = CellHandle(run, self.pending)
            if args.wait:
                self.pending.forget(names)
                self.pending.add(run, pending=False)
                return self._wait(run, args.timeout, presses)
            self.pending.add(run)
            view = make_view(handle, label, self.shell)
            run.view = view
            self.views[handle.id] = view
            if isinstance(view, TaskWidget):
                view.show()
            follow(handle, view.apply)
            if args.timeout:
                timer = threading.Timer(args.timeout, cancel_task, (handle,))
                timer.daemon = True
                timer.start()
                self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            return None

    def _moving(self, args: Any) -> Moving:
        """When a cell goes where it would anyway rather than wait for a busy holder."""
        settings = self.app.settings
        usual = cell_task(self.app).usual_queue(tuple(args.requires) or None)
        queue = usual or settings.default_queue
        return Moving.through(self.app.store, queue, settings.move_bytes, self.app.sent_to)

    def _wait(self, run: CellRun, timeout: float | None, presses: StopPresses) -> Any:
        """Stream a task's output into this cell as it comes; return its last expression.

        Called while ``presses`` counts Stop, never raised in the middle of a step. Stop
        interrupts the task and the cell follows it to its end, as a local cell's code
        goes on after an interrupt it handles: one that ends well ends the cell as any
        other; one the interrupt ended (or a second Stop killed) leaves the names it bound
        so far, and the cell says once that its task was cancelled.
        """
        stopping = Stopping(run.handle, run.label, presses)
        result, later = follow_to_the_end(run.handle, run.label, self.shell, timeout, stopping)
        try:
            # Its final event came: its outcome follows (unless Stop ended the wait).
            while not (run.handle.done() or stopping.act()):
                time.sleep(0.02)
            if not run.handle.done():
                raise stopping.error() from None
            if stopping.interrupted and run.handle.state in _STOPPED:
                with contextlib.suppress(TaskRevoked, WorkerLost):  # as it should: stopped
                    self.pending.deliver(run, raise_errors=True)
                raise stopping.error() from None
            self.pending.deliver(run, raise_errors=True)
            out = f"Out[{self.shell.execution_count}]"
            shown, run.shown = run.shown, None  # nor the notebook's objects it names, once shown
            return out_value(shown, result, self.shell.user_ns, self.pending.took_kept, out)
        finally:
            show_after_out(self.shell, later)


def _refuse_names_not_assigned(args: Any, back: set[str]) -> None:
    """Refuse ``--keep``/``--fetch`` names the cell does not assign (``back``): nothing is sent."""
    flag = getattr(args, "name_after", "")
    if flag and args.name in back:  # "--keep x y": y meant as a second name, surely
        raise CellError(
            f"{flag} takes one name: {args.name!r} would name the cell, not be one more "
            f"{flag} name; write {flag} {args.name} for it too, or the cell's name "
            "first. Nothing was sent"
        )
    unassigned = [n for n in (*args.keep, *args.fetch) if n not in back]
    if unassigned:
        raise CellError(
            f"--keep/--fetch name {', '.join(map(repr, unassigned))}, which the cell does "
            "not assign; name variables the cell assigns. Nothing was sent"
        )


def _by_value(names: Iterable[str], values: Iterable[Any]) -> dict[str, Any]:
    """The notebook's objects a cell is sent, by name: not the references to kept values."""
    pairs = zip(names, values, strict=True)
    return {name: value for name, value in pairs if not isinstance(value, RemoteValue)}


def _store_of(app: App) -> tuple[str, str]:
    """Where ``app`` keeps records and blobs: its store's URL and key prefix."""
    settings = app.settings
    where = app.cluster.url if app.cluster is not None else settings.broker_url
    return (settings.result_url or where or "", settings.key_prefix)


def _first_line(cell: str) -> str:
    for text in cell.splitlines():
        if text.strip() and not text.lstrip().startswith("#"):
            return text.strip()[:40]
    return "cell"
