"""One ``%%task`` execution as the notebook sees it, and the errors its names raise."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from nbtask.errors import TaskRevoked, WorkerLost
from nbtask.notebook.follow import one_line

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle
    from nbtask.notebook.fingerprints import Fingerprint
    from nbtask.notebook.widgets import TaskView

__all__ = ["CellRun", "lost_error", "named_in", "revoked_error", "sent_label", "sent_objects_of"]

#: When nbtask was loaded in this kernel (see :meth:`CellRun.ended_unasked`).
_LOADED = time.time()


@dataclasses.dataclass(eq=False)
class CellRun:
    """One ``%%task`` execution as the notebook sees it."""

    handle: TaskHandle
    label: str
    names: tuple[str, ...]
    view: TaskView | None = None
    submitted: float = dataclasses.field(default_factory=time.time)
    delivered: bool = False
    #: Its names that a later cell (or the notebook itself) bound meanwhile: its values
    #: for them are older than what the notebook holds, and never written.
    superseded: set[str] = dataclasses.field(default_factory=set)
    #: Its names the cell binds anew (the others it may only change in place).
    rebound: frozenset[str] = frozenset()
    #: The notebook's process-wide state it was sent with (random generators included).
    state: bytes = b""
    #: How its last expression's value came back (a ``--wait`` cell's ``Out``), if it did.
    shown: Any = None
    #: The notebook's objects it was sent, by name, until it is seen finished: a name the
    #: cell binds to one of them is bound to it (``alias = small``: ``alias is small``),
    #: as are its values that hold one (``pair = (small, 1)``). Once it has ended, only
    #: those its values name are held (see :meth:`ended`).
    sent: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The notebook's number for the cell that sent it (``In[cell]``), 0 if unknown.
    cell: int = 0
    #: A background cell's shipped and carried values as they were sent, by name: one the
    #: notebook changed meanwhile is not written over by the cell's change to it.
    prints: dict[str, Fingerprint] = dataclasses.field(default_factory=dict)
    #: Sent by an earlier kernel of the notebook, re-attached here (``app.handle(id)``):
    #: only its names the notebook does not bind are written, and nothing else it did
    #: (to objects, classes, process state of that kernel, gone with it).
    reattached: bool = False

    def ended_unasked(self) -> bool:
        """Whether its values are written only when asked for (``get()``), not as it ends.

        A re-attached cell that ended before nbtask was loaded in this kernel: it may have
        ended while the kernel that sent it ran, and locally its values went with that
        kernel. One that ended since ended with no kernel to take them: they are written.
        """
        if not self.reattached:
            return False
        finished = getattr(self.handle, "finished_at", None)
        return finished is None or finished < _LOADED

    def ended(self, handle: Any) -> None:
        """Let go of the objects it was sent that its values do not name (a done callback).

        Called on the thread that read its final event, maybe while the main thread
        delivers it: the objects its values name stay (the main thread may be loading
        them), the others are dropped from :attr:`sent` in place. A failed run's values
        are those it bound before its failing line (set before this is called). A result
        not loaded yet (a large one, read from the store when delivered) cannot tell: all
        stay until then.
        """
        try:
            failed = handle.error is not None
            outcome = handle.partial if failed else concurrent.futures.Future.result(handle, 0)
        except Exception:  # cancelled, say: delivered or not, the objects go then
            return
        if not failed and not isinstance(outcome, Mapping):
            return
        needed = named_in(outcome) if isinstance(outcome, Mapping) else set()
        sent = self.sent
        for name in [n for n in sent if n not in needed]:
            sent.pop(name, None)


def sent_label(handle: Any) -> str:
    """A task's label as it was sent (a restarted kernel reads it from the task's record)."""
    name = "cell" if handle.name == "nbtask.cell" else handle.name
    return str(handle.label) or f"{name} {handle.id[:8]}"


def sent_objects_of(run: CellRun, names: Mapping[str, str]) -> dict[str, Any]:
    """``{name: object}`` for the names the cell bound to an object it was sent, unchanged.

    ``names``: ``{name: shipped name}``; each is bound to the very object the cell was
    sent under the shipped name (the notebook's, even if it rebound that name meanwhile),
    as locally.
    """
    return {name: run.sent[source] for name, source in names.items() if source in run.sent}


def named_in(effects: Mapping[str, Any]) -> set[str]:
    """The shipped names a cell's values name: bound to one, or held inside them."""
    sent = effects.get("sent")
    inside = effects.get("sent_inside")
    named = set(sent.values()) if isinstance(sent, Mapping) else set()
    return named | set(inside) if isinstance(inside, Mapping) else named


def revoked_error(run: CellRun, names: Iterable[str]) -> TaskRevoked:
    """A cancelled cell's error where its names are read: one line naming the cell."""
    reason = run.handle.info.get("reason")
    why = f" ({reason})" if reason and reason != "revoked" else ""
    wanted = ", ".join(names) or "what it assigns"
    return one_line(
        TaskRevoked(
            f"task {run.label!r} [{run.handle.id[:8]}] was cancelled{why} before it ended: "
            f"run the cell again to set {wanted}"
        )
    )


def lost_error(run: CellRun, names: Iterable[str], exc: WorkerLost) -> WorkerLost:
    """The error of a cell whose worker was lost, where its names are read: one line.

    Lost, not died: the reason says what is known (a process that exited, or one that
    stopped answering, which may have been paused or cut off).
    """
    reason = run.handle.info.get("reason") or exc.evalue
    wanted = ", ".join(names) or "what it assigns"
    said = (
        f"task {run.label!r} [{run.handle.id[:8]}] did not end: the worker process running "
        f"it was lost ({reason}); run the cell again to set {wanted}"
    )
    return one_line(WorkerLost("WorkerLost", said, "", run.handle.id))
