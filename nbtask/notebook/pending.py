"""Pending names: what a background ``%%task`` cell will assign, delivered on the main thread.

A non-blocking cell makes the names it assigns (and the shipped values it may change in
place) *pending*. A later cell that reads one waits for that task first (an AST transformer
inserts the wait as the cell's first statement, so the kernel's interrupt stops it like any
code); cells that read no pending name run at once. Finished tasks' values are written into
the namespace only from the kernel's main thread: in that wait, or in a ``pre_run_cell``
hook — never from the listener thread.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from nbtask.core.task_errors import unloadable_value, unloadable_values
from nbtask.errors import BlobError, TaskRevoked, WorkerLost
from nbtask.notebook import process_state
from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.carried import WithObjects, load_each, load_values, share_namespace
from nbtask.notebook.cell_run import CellRun, lost_error, revoked_error, sent_objects_of
from nbtask.notebook.fingerprints import changed_since
from nbtask.notebook.follow import (
    POLL_SECONDS,
    StopPresses,
    cancel_task,
    cancelled,
    ended_within,
    one_line,
    wait_interruptibly,
)
from nbtask.notebook.guard import awaited, pending_objects, run_of
from nbtask.notebook.inplace import bring_back
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.remote_errors import local_exception
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import Envelope
from nbtask.wire.events import State, lacks_code
from nbtask.wire.item_loads import SharedWithFailed

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle

__all__ = ["Pending"]

#: How long an interrupted cell waits for its task to end: the worker's grace before it
#: kills a task that ignores the interrupt (5 s), and some.
_STOPPING_SECONDS = 10.0


class Pending:
    """The notebook's cell runs and the names they will assign.

    Parameters
    ----------
    namespace
        The notebook's ``user_ns``; written only from the main thread.
    """

    def __init__(
        self,
        namespace: MutableMapping[str, Any],
        on_kept: Callable[[RemoteValue], None] | None = None,
        apply_state: Callable[[Mapping[str, Any]], None] = process_state.apply,
    ) -> None:
        self.namespace = namespace
        self._apply_state = apply_state  # what a cell changed of the process's state
        self.runs: list[CellRun] = []
        #: Runs not seen finished yet: all that :meth:`harvest` looks at, however many ran.
        self._unfinished: list[CellRun] = []
        self.owner: dict[str, CellRun] = {}
        self._on_kept = on_kept
        #: A kept value was ever delivered (so cells are looked at for reads of one).
        self.holds_kept = False
        self._modules_told: set[str] = set()  # said to be changed on a worker

    def kept(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` bound to values kept on the workers."""
        return [n for n in names if isinstance(self.namespace.get(n), RemoteValue)]

    def took_kept(self, value: RemoteValue) -> None:
        """A kept value reached the notebook: bound to be fetched, and looked for in cells."""
        if self._on_kept is not None:
            self._on_kept(value)
            self.holds_kept = True

    def add(self, run: CellRun, *, pending: bool = True) -> None:
        """Track a run; with ``pending`` its names wait for it."""
        self.runs.append(run)
        self._unfinished.append(run)
        run.handle.add_done_callback(run.ended)
        if pending:
            earlier_runs = []
            for name in run.names:
                earlier = self.owner.get(name)
                if earlier is not None and earlier is not run:
                    earlier.superseded.add(name)  # the later cell's value wins, as locally
                    earlier_runs.append(earlier)
                self.owner[name] = run
            self._let_go(earlier_runs)

    def awaited(self, reads: Iterable[str]) -> list[str]:
        """The names a cell reading ``reads`` waits for (see :func:`~.guard.awaited`)."""
        return awaited(self.owner, self.namespace, reads)

    def forget(self, names: Iterable[str]) -> None:
        """The notebook rebinds these names itself: later task values must not win."""
        earlier_runs = []
        for name in names:
            earlier = self.owner.pop(name, None)
            if earlier is not None:
                earlier.superseded.add(name)
                earlier_runs.append(earlier)
        self._let_go(earlier_runs)

    def _let_go(self, runs: Iterable[CellRun]) -> None:
        """Failed runs whose names were all bound anew let go of the objects they were sent.

        Their values would never be written (locally the names no longer hold them).
        """
        runs = [run for run in runs if run.handle.done() and run.handle.error is not None]
        if runs:
            owners = {id(run) for run in self.owner.values()}
            for run in runs:
                if id(run) not in owners:
                    run.sent, run.prints = {}, {}

    def running(self) -> list[CellRun]:
        """Runs not finished yet."""
        return [r for r in self.runs if not r.handle.done()]

    def unwritten(self, handle: TaskHandle) -> bool:
        """Whether ``handle``'s run has values not written into the namespace yet.

        Until it is seen finished (delivered, or failed): any thread may ask.
        """
        return any(run.handle is handle and not run.delivered for run in self._unfinished)

    def say_if_random_repeats(self, run: CellRun, source: str) -> None:
        """Say so if ``run`` draws the same random numbers as a run still going.

        Locally a cell's random numbers follow on from the cell before's. A cell sent
        while another, sent from the same random state, still runs starts where that one
        started: whatever both draw repeats (bootstrap samples, say, all alike). Only a
        cell whose code names ``random`` is looked at.
        """
        if not run.state or "random" not in source:
            return
        twin = next((r for r in self.running() if r.state == run.state and r is not run), None)
        if twin is not None:
            print(
                f"nbtask: {run.label!r} starts from the same random state as {twin.label!r} "
                f"[{twin.handle.id[:8]}], which still runs: the random numbers both draw "
                "repeat each other (one after the other, they would follow on); seed each "
                "cell differently, or run them with --wait",
                file=sys.stderr,
            )

    def cancel_running(self, timeout: float) -> None:
        """Cancel the runs not finished; wait up to ``timeout`` seconds for started ones.

        A queued one that is revoked never runs: there is nothing to wait for.
        """
        running = self.running()
        started = [run for run in running if run.handle.state is not State.PENDING]
        for run in running:
            cancel_task(run.handle)
        deadline = time.monotonic() + timeout
        while any(not run.handle.done() for run in started) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)

    def interrupted(self, run: CellRun, presses: StopPresses) -> KeyboardInterrupt:
        """Cancel the task of a waited-for cell that Stop stopped; its error.

        Called while ``presses`` counts the Stops, so none cuts the cancelling short. The
        names the cell bound before the interrupt reached it come back first, as an
        interrupted cell leaves them bound locally (the worker sends them as it stops); a
        further Stop ends that wait.
        """
        cancel_task(run.handle)
        if ended_within(run.handle, _STOPPING_SECONDS, presses):
            with contextlib.suppress(TaskRevoked):  # as it should: it was cancelled
                self.deliver(run, raise_errors=True)
        return cancelled(run.label)

    def harvest(self) -> None:
        """Write the values of every successfully finished run (main thread only).

        A run seen finished is not looked at again: it is delivered now, or, failed, its
        error is raised when a cell reads one of its names.
        """
        unfinished = []
        for run in self._unfinished:
            if not run.handle.done():
                unfinished.append(run)
                continue
            if not run.delivered and run.handle.error is None:
                self.deliver(run)
            # A failed run keeps the objects its values name until a cell reads its names
            # (they are delivered then, bound to those objects as locally).
            self._let_go([run])
        self._unfinished = unfinished

    def wait(self, names: Iterable[str], stay: Iterable[str] = ()) -> None:
        """Wait for the runs that assign ``names``, deliver their values, fetch kept ones.

        Kept values named in ``stay`` are not fetched: the cell only shows them, passes
        them to tasks, deletes them, or is a ``%%task`` cell (which uses them in place).

        Raises
        ------
        KeyboardInterrupt
            Interrupted while waiting: the task is cancelled as well.
        BaseException
            The task failed: the user's own exception type where it can be rebuilt.
        """
        wanted = list(dict.fromkeys(names))
        objects = pending_objects(self.owner, self.namespace)
        found = {n: run_of(n, self.owner, self.namespace, objects) for n in wanted}
        runs = list(dict.fromkeys(pair[0] for pair in found.values() if pair is not None))
        for run in runs:
            if not run.handle.done():
                mine = ", ".join(
                    pair[1] if pair[1] == n else f"{pair[1]} ({n} is the same object)"
                    for n, pair in found.items()
                    if pair is not None and pair[0] is run
                )
                print(
                    f"nbtask: waiting for task {run.label!r} [{run.handle.id[:8]}], "
                    f"which assigns {mine}",
                    flush=True,
                )
                try:
                    wait_interruptibly(run.handle)
                except KeyboardInterrupt:
                    raise cancelled(run.label) from None
            self.deliver(run, raise_errors=True, read=wanted)
        staying = set(stay)
        for name in self.kept(n for n in wanted if n not in staying):
            value = self.namespace[name]
            if not isinstance(value, RemoteValue):  # bound to one fetched under another name
                continue
            if not value.fetched:
                print(
                    f"nbtask: fetching {name} ({value.size / 1e6:,.1f} MB) from the workers",
                    flush=True,
                )
            try:
                fetched = value.fetch()
                self.namespace[name] = fetched
                # Its other names are bound to the one object, as locally (IPython's own
                # output history is left to IPython).
                for other in self.names_of(value):
                    self.namespace[other] = fetched
                del fetched
                continue
            except KeyboardInterrupt:
                said = f"fetching {name} was interrupted: it is still the reference"
                error: BaseException = KeyboardInterrupt(said)
            except BlobError as exc:  # one line that names the variable, no nbtask frames
                said = str(exc)
                if not any(said.startswith(f"{n} ") for n in [name, *self.names_of(value)]):
                    said = f"{name} cannot be fetched: {said}"
                error = BlobError(said)
            # Raised out of the handler, with no context: the notebook keeps the traceback
            # (sys.last_traceback), which would keep the reference, and so the value on its
            # holder, once the cell that follows the error's advice rebinds the name.
            del value
            raise one_line(error)

    def deliver(
        self, run: CellRun, *, raise_errors: bool = False, read: Iterable[str] = ()
    ) -> None:
        """Write a finished run's values into the namespace, or raise its error.

        An error that says which names the cell did not set names those of them in
        ``read`` (the names a later cell reads), else all of them.
        """
        if run.delivered:
            return
        exc = run.handle.error
        if exc is not None and not raise_errors:
            return  # shown in its view; raised when a later cell reads one of its names
        run.delivered = True
        mine = [n for n, r in self.owner.items() if r is run]
        try:
            # A failed cell's effects before its failing line happened too, as locally.
            effects = run.handle.partial if exc is not None else run.handle.result(0)
            came: Iterable[str] = ()
            if isinstance(effects, Mapping):
                self._apply(run, effects)
                came = effects.get("names", ())  # bound before it was stopped
            unset = [n for n in mine if n not in came]
            unset = [n for n in unset if n in set(read)] or unset
            if isinstance(exc, TaskRevoked):
                raise revoked_error(run, unset) from None
            if isinstance(exc, WorkerLost):
                raise lost_error(run, unset, exc) from None
            if exc is not None:
                raise local_exception(exc, self.namespace)
        finally:
            run.sent, run.prints = {}, {}
            self.forget(mine)

    def _apply(self, run: CellRun, effects: Mapping[str, Any]) -> None:
        """Write a cell's names and process-wide state changes into this kernel."""
        # The notebook's objects its values hold: loaded as they are, not as copies.
        objects = {n: run.sent[n] for n in effects.get("sent_inside", ()) if n in run.sent}
        arrived, unloaded = _loaded(run, effects, objects)
        run.shown = _with_objects(effects.get("shown"), objects)
        del objects
        known = self._known_references(arrived)
        # No loop variable left holding one of the values: bring_back counts references.
        for kept in [v for v in arrived.values() if isinstance(v, RemoteValue)]:
            if not any(kept is mine for mine in known):
                self.took_kept(kept)
        del known
        changed = effects.get("kept_in_place", ())
        self._changed_kept(arrived, [n for n in changed if n not in run.superseded])
        in_place = [n for n in effects.get("in_place", ()) if n not in run.superseded]
        for name in self._changed_meanwhile(run, in_place):
            in_place.remove(name)
            arrived.pop(name, None)  # the notebook keeps its object, with its own change
        sent = sent_objects_of(run, effects.get("sent", {}))
        run.sent = {}  # not counted as a holder of the objects bring_back writes into
        arrived = bring_back(self.namespace, arrived, in_place, _say)  # empties the first
        arrived.update(sent)
        del sent
        for name, value in arrived.items():
            if name not in run.superseded:
                self.namespace[name] = value
        for name in effects.get("deleted", ()):
            if name not in run.superseded:
                self.namespace.pop(name, None)
        self._rehome(effects.get("held"))
        share_namespace(self.namespace, arrived)
        skipped = {**effects.get("skipped", {}), **unloaded}
        unknown = "the object it was bound to is no longer known here"
        skipped.update({n: unknown for n in effects.get("sent", {}) if n not in arrived})
        for name, why in skipped.items():
            self._not_brought_back(run, name, why)
        self._say_modules_changed(effects.get("modules_changed", ()))
        state = effects.get("state")
        if state and state != process_state.NO_CHANGES:
            self._apply_state(Envelope({}, state).load_body())

    def _changed_meanwhile(self, run: CellRun, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose notebook object changed since ``run`` was sent; said.

        The cell changed its copy; writing that into the notebook's object would undo what
        the notebook did to it meanwhile (through a name no guard saw: an attribute of
        another object, ``exec``). The notebook's change is kept, and one line says so.
        """
        prints, run.prints = run.prints, {}
        changed = changed_since(prints, self.namespace, names)
        for name in changed:
            _say(
                f"nbtask: {name}: the changes task {run.label!r} [{run.handle.id[:8]}] made "
                f"to it were not applied: the notebook changed {name} while the task ran, "
                "and applying them would have undone that. The notebook keeps its own "
                f"{name}; to have both, run the cell again (it starts from this {name}), "
                "or run such cells with --wait"
            )
        return changed

    def _say_modules_changed(self, names: Iterable[str]) -> None:
        """Say once per module that a cell changed its state on a worker, not here."""
        for name in names:
            if not isinstance(name, str) or name in self._modules_told:
                continue
            self._modules_told.add(name)
            _say(
                f"nbtask: the cell changed the state of the notebook's module {name!r} "
                "(its top-level values) on the worker; such changes stay there and this "
                "kernel's module is as it was. Return what you need as a variable of the cell"
            )

    def _known_references(self, arrived: dict[str, Any]) -> list[RemoteValue]:
        """Put the notebook's own reference in place of each that stands for the same value.

        A cell that binds a kept value it read to another name (``alias = big``) sends
        back the reference it was given (same keeper): the notebook's, so both names are
        bound to one object, as locally. Returns the references put in (already tracked);
        one whose value the cell's process now holds is told so.
        """
        if not any(isinstance(value, RemoteValue) for value in arrived.values()):
            return []  # the usual cell: no scan of a namespace that grows with every cell
        held = [v for v in self.namespace.values() if isinstance(v, RemoteValue) and v.keeper]
        known = {(value.key, value.keeper): value for value in held}
        put = []
        for name, value in arrived.items():
            mine = known.get((value.key, value.keeper)) if isinstance(value, RemoteValue) else None
            if mine is None or mine is value:
                continue
            if (mine.holder, mine.holder_pid) != (value.holder, value.holder_pid):
                mine.holder, mine.holder_pid = value.holder, value.holder_pid
                self.took_kept(mine)
            arrived[name] = mine
            put.append(mine)
        return put

    def _changed_kept(self, arrived: Mapping[str, Any], names: Iterable[str]) -> None:
        """Kept values a cell changed in place: every name bound to one sees the change.

        The change comes back under a new reference for the names the cell used; the
        notebook's other names for the old reference (``alias`` of ``alias = big``, when
        the cell changed ``big``) are bound to the new one too, as locally.
        """
        for name in names:
            old, new = self.namespace.get(name), arrived.get(name)
            if not isinstance(old, RemoteValue) or new is None or new is old:
                continue
            for other in self.names_of(old):
                if other not in arrived:
                    self.namespace[other] = new

    def names_of(self, value: RemoteValue) -> list[str]:
        """The names bound to ``value``, but IPython's history names (``_``, ``_3``)."""
        found = [n for n, bound in list(self.namespace.items()) if bound is value]
        return [n for n in found if not is_history_name(n)]

    def _not_brought_back(self, run: CellRun, name: str, why: str) -> None:
        """Say that the cell's value for ``name`` could not come back (it cannot be pickled).

        A name the cell bound anew would no longer hold its old value locally: it goes, so
        that no later cell uses the old one unawares. One it changed in place keeps the
        value it had before the cell.
        """
        if name in run.superseded:
            return
        if name in run.rebound:
            self.namespace.pop(name, None)
            said = "it is not defined in the notebook after this cell"
        else:
            said = "the notebook keeps its value from before the cell"
        print(f"nbtask: {name} did not come back from the worker ({why}): {said}", file=sys.stderr)

    def _rehome(self, held: Mapping[str, list[Any]] | None) -> None:
        """Kept values the cell read and its process now holds: later work goes there.

        The cell loaded them from their store copy (their holder was gone, or another
        process ran it); a name rebound meanwhile is left alone.
        """
        for name, (key, holder, pid) in (held or {}).items():
            value = self.namespace.get(name)
            if isinstance(value, RemoteValue) and value.key == key:
                value.holder, value.holder_pid = str(holder), int(pid)
                if self._on_kept is not None:
                    self._on_kept(value)


def _loaded(
    run: CellRun, effects: Mapping[str, Any], objects: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A cell's values, and why each that cannot be loaded here did not come back.

    They are loaded together (names that share an object share it); if they do not load
    so (a class only the workers can import, a ``__setstate__`` raising here), one at a
    time: one that cannot be loaded loses no other.
    """
    try:
        return load_values(effects, objects), {}
    except Exception as exc:
        whole = exc
    try:
        arrived, failed = load_each(effects, objects)
    except Exception:  # not one value's failure: none is bound
        raise one_line(
            unloadable_values(run.label, _why(whole), missing=_missing(whole))
        ) from whole
    unloaded = {
        name: str(exc)
        if isinstance(exc, SharedWithFailed)
        else unloadable_value(_why(exc), missing=_missing(exc))
        for name, exc in failed.items()
    }
    return arrived, unloaded


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _missing(exc: BaseException) -> bool | None:
    """Whether what ``exc`` says is missing here: ``None`` if it says it all."""
    # An UnpicklingError: a notebook object they name is gone, as it says.
    return None if isinstance(exc, pickle.UnpicklingError) else lacks_code(exc)


def _with_objects(shown: Any, objects: Mapping[str, Any]) -> Any:
    """A ``--wait`` cell's last expression as it came, loaded with ``objects`` when asked."""
    if objects and isinstance(shown, tuple) and len(shown) == 2 and shown[0] == "value":
        how, packed = shown
        if isinstance(packed, Packed):
            return (how, WithObjects(packed, dict(objects)))
    return shown


def _say(line: str) -> None:
    print(line, file=sys.stderr)
