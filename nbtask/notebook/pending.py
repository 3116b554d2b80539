"""Pending names: what a background ``%%task`` cell will assign, delivered on the main thread.

A non-blocking cell makes the names it assigns (and the shipped values it may change in
place) *pending*. A later cell that reads one waits for that task first (an AST transformer
inserts the wait as the cell's first statement, so the kernel's interrupt stops it like any
code); cells that read no pending name run at once. Finished tasks' values are written into
the namespace only from the kernel's main thread: in that wait, or in a ``pre_run_cell``
hook — never from the listener thread. How they are written is
:mod:`nbtask.notebook.write_back`'s.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from nbtask.errors import BlobError, TaskRevoked, WorkerLost
from nbtask.notebook import process_state
from nbtask.notebook.cell_run import CellRun, lost_error, revoked_error
from nbtask.notebook.follow import (
    POLL_SECONDS,
    cancel_task,
    cancelled,
    one_line,
    wait_interruptibly,
)
from nbtask.notebook.guard import awaited, pending_objects, run_of
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.kept_inside import kept_inside, replace_inside
from nbtask.notebook.remote_errors import local_exception, said_first
from nbtask.notebook.write_back import WriteBack
from nbtask.wire.events import State

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle

__all__ = ["Pending"]


class Pending(WriteBack):
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
        #: Names whose values arrived holding kept values' references (``d = {"k": arr}``).
        self.kept_holders: set[str] = set()
        self._modules_told: set[str] = set()  # said to be changed on a worker

    def kept(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` bound to values kept on the workers."""
        return [n for n in names if isinstance(self.namespace.get(n), RemoteValue)]

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
            if not run.delivered and run.handle.error is None and not run.ended_unasked():
                self.deliver(run)
            # A failed run keeps the objects its values name until a cell reads its names
            # (they are delivered then, bound to those objects as locally).
            self._let_go([run])
        self._unfinished = unfinished

    def wait(
        self,
        names: Iterable[str],
        stay: Iterable[str] = (),
        parts: Mapping[str, list[Any]] | None = None,
    ) -> None:
        """Wait for the runs that assign ``names``, deliver their values, fetch kept ones.

        Kept values named in ``stay`` are not fetched: the cell only shows them, passes
        them to tasks, deletes them, or is a ``%%task`` cell (which uses them in place).
        Those a container bound to a name holds are fetched into it: only its items under
        ``parts[name]``, if given (a cell reading ``Out[5]`` only).

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
                mine = _assigned_as_read(run, found)
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
        self.fetch([n for n in wanted if n not in staying], parts)

    def fetch(self, names: Iterable[str], parts: Mapping[str, list[Any]] | None = None) -> None:
        """Fetch the kept values ``names`` are bound to, or hold inside (see :meth:`wait`).

        Each name is bound to the value fetched, and so is every other name bound to its
        reference, as a local cell reading the name would have it.

        Raises
        ------
        BlobError
            A value cannot be fetched (over the fetch budget, its store copy gone...).
        """
        wanted = list(names)
        for name in self.kept(wanted):
            if isinstance(self.namespace[name], RemoteValue):  # not one fetched under another
                # No local name holds the reference: the traceback of a failed fetch (which
                # the notebook keeps) would keep it, and its value on its holder.
                self.namespace[name] = self.fetched(name, self.namespace[name])
        for name in self.holding_kept(wanted):
            keys = (parts or {}).get(name)
            value = self.namespace[name]
            fetch = functools.partial(self._fetched_inside, name)
            whole = replace_inside(value, fetch, keys)
            if whole is not value:  # a tuple made anew around the values
                self.namespace[name] = whole

    def holding_kept(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` bound to a container holding kept values' references.

        A cell's value holding a kept value it bound to a name too (``d = {"k": arr}``),
        the output history (``Out``) holding a cell's large last expression.
        """
        chosen = [n for n in names if n in self.kept_holders or n in ("Out", "_oh")]
        found = [n for n in chosen if kept_inside(self.namespace.get(n))]
        self.kept_holders.difference_update(n for n in chosen if n not in found)
        return found

    def _fetched_inside(self, holder: str, value: RemoteValue) -> Any:
        return self.fetched(value.name, value, holder)

    def fetched(self, name: str, value: RemoteValue, holder: str = "") -> Any:
        """``value`` fetched, as a cell that reads ``name`` (in ``holder``, if given) wants.

        Its names are bound to the one object fetched, as locally (IPython's own output
        history is left to IPython).
        """
        where = f" (in {holder})" if holder else ""
        if not value.fetched:
            print(
                f"nbtask: fetching {name}{where} ({value.size / 1e6:,.1f} MB) from the workers",
                flush=True,
            )
        try:
            fetched = value.fetch()
            for other in self.names_of(value):
                self.namespace[other] = fetched
            return fetched
        except KeyboardInterrupt:
            said = f"fetching {name}{where} was interrupted: it is still the reference"
            error: BaseException = KeyboardInterrupt(said)
        except BlobError as exc:  # one line that names the variable, no nbtask frames
            said = str(exc)
            if not any(said.startswith(f"{n} ") for n in [name, *self.names_of(value)]):
                said = f"{name}{where} cannot be fetched: {said}"
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
            if run.reattached and isinstance(effects, Mapping):
                effects = _from_earlier_kernel(run, effects, self.namespace)
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
            if exc is not None and read:
                # Raised in the cell that reads its names: it says which cell failed.
                named = [n for n in mine if n in set(read)] or mine
                line = (
                    f"nbtask: task {run.label!r} [{run.handle.id[:8]}], which assigns "
                    f"{', '.join(named)}, failed in the background; the names it bound "
                    "before its error are set:"
                )
                raise said_first(local_exception(exc, self.namespace), line)
            if exc is not None:
                raise local_exception(exc, self.namespace)
        finally:
            run.sent, run.prints = {}, {}
            self.forget(mine)


#: What a cell did to the kernel that sent it, gone with it: never applied to another.
_THAT_KERNELS = ("in_place", "kept_in_place", "deleted", "state", "classes_changed")


def _from_earlier_kernel(
    run: CellRun, effects: Mapping[str, Any], namespace: Mapping[str, Any]
) -> dict[str, Any]:
    """The effects of a cell an earlier kernel sent, as this one takes them.

    Its names the notebook does not bind (the notebook's own win, as a later cell's
    would); not its changes to that kernel's objects, classes or process state.
    """
    run.superseded.update(n for n in effects.get("names", ()) if n in namespace)
    return {k: v for k, v in effects.items() if k not in _THAT_KERNELS}


def _assigned_as_read(run: CellRun, found: Mapping[str, tuple[CellRun, str] | None]) -> str:
    """``lst, d (alias is the same object)``: what ``run`` assigns that a cell reads.

    Each of its names once, with the other names the cell reads it by.
    """
    aliases: dict[str, list[str]] = {}
    for name, pair in found.items():
        if pair is not None and pair[0] is run:
            others = aliases.setdefault(pair[1], [])
            if name != pair[1]:
                others.append(name)
    return ", ".join(
        f"{own} ({', '.join(others)} {'is' if len(others) == 1 else 'are'} the same object)"
        if others
        else own
        for own, others in aliases.items()
    )
