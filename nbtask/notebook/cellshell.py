"""Notebook cells, worker side: run a cell, send back what changed, as it would be locally.

:func:`execute_cell` runs a :class:`~nbtask.notebook.shipping.CellSpec` in the worker's
IPython shell (:mod:`nbtask.notebook.worker_shell`), in a fresh namespace holding only what
was shipped, with the kernel's process-wide state applied first
(:mod:`nbtask.notebook.process_state`). It returns the names the cell assigned, shipped
values it changed in place (found by a digest of their pickled state) and the process-wide
state it changed. When the cell fails, the same comes back with its error: what it did
before the failing line happened, as it would have locally.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from nbtask.core.context import CELL_FRAMES, PARTIAL_RESULT, SHOWN_TRACEBACK
from nbtask.errors import BlobError, BlobGone
from nbtask.notebook import (
    cell_changes,
    cell_values,
    class_state,
    module_state,
    process_state,
    task_threads,
)
from nbtask.notebook.carried import share_namespace
from nbtask.notebook.cell_guards import refuse_terminal
from nbtask.notebook.kept import RemoteValue, key_by_content
from nbtask.notebook.kept_inside import may_hold_kept, replace_inside
from nbtask.notebook.logging_state import cell_logging
from nbtask.notebook.module_code import say_which_differ
from nbtask.notebook.shipping import CellSpec
from nbtask.notebook.worker_shell import (
    fresh_namespace,
    shown_syntax_error,
    shown_traceback,
    worker_shell,
)
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import Envelope

__all__ = ["execute_cell", "prepare_cell"]
#: Kept values sent back as the references they came as: ``{id(value): (name, reference)}``.
Kept = dict[int, tuple[str, RemoteValue]]
_APPLIED = process_state.Applied()  # the kernel's state this process is in


def execute_cell(spec: CellSpec, blob: Packed, datasets: Mapping[str, Any] | None = None) -> Any:
    """Run a cell in this process's worker shell, in a fresh namespace.

    ``datasets`` are the named datasets the cell requires, held by this worker: they are
    the cell's variables of those names, never sent back.

    Returns
    -------
    dict
        ``{"values": pickled {name: value}, "names": [...], "skipped": {name: why},
        "deleted": [...], "in_place": [...], "state": {kind: state}, "modules_changed":
        [...]}`` (``modules_changed``: the notebook's modules whose state the cell changed
        here, see :mod:`~nbtask.notebook.module_state`; ``"classes_changed"``, the
        notebook's classes whose own attributes it changed, pickled, and
        ``"classes_unsent"``, lines for what of them cannot come back, see
        :mod:`~nbtask.notebook.class_state`; ``in_place``: the
        shipped values the cell changed without rebinding them; ``"sent"``: ``{name: shipped
        name}``, names bound to a notebook object the cell was sent and left unchanged, and
        ``"sent_inside"``, the shipped names of those the values hold, pickled as persistent
        ids, see :class:`~nbtask.notebook.cell_changes.SentObjects`), and ``"shown"`` (the
        last expression's value, see :func:`~nbtask.notebook.cell_values.shown_value`) when
        ``spec.shows`` names it; with ``spec.plain`` just ``{name: value}``.

    Raises
    ------
    BaseException
        The cell's own exception, its traceback starting at the cell's first line, and
        its partial effects (packed as a success's) in
        :data:`~nbtask.core.context.PARTIAL_RESULT`.
    """
    shell = worker_shell()
    for attempt in range(spec.retries + 1):
        loaded: dict[str, Any] = blob.load()
        references = {n: v for n, v in loaded.items() if isinstance(v, RemoteValue)}
        rehomed, kept_before, kept_read = _resolve_all(loaded, references, may_hold_kept(blob))
        shipped = loaded
        # A kept value's state is its key by content, known already: it is hashed after
        # the cell only.
        sizes: dict[str, int] = {}  # the pickled size of each, as the notebook holds it
        before = cell_changes.digests(shipped, skip=references, sizes=sizes)
        before.update(kept_before)
        # A new namespace, the last one left to a thread its cell left running: one that
        # calls its cell's functions reads and writes that cell's names, never this one's.
        namespace = fresh_namespace(shell, threads=task_threads.running())
        namespace.update(shipped)
        namespace.update(datasets or {})
        # A dataset is the worker's: like a shipped value, it returns only if changed.
        shipped.update(datasets or {})
        # The shipped functions are made to read this namespace: the copies that do so are
        # still the shipped functions (they go back only if the cell rebinds them or sets
        # their attributes). The values they carried (the globals they named: ``results``
        # of ``def record(x): results.append(x)``) are shipped values too, not assigned
        # here: changed in place, through the functions or not, they come back as any other.
        carried = {n: namespace[n] for n in share_namespace(namespace, list(shipped))}
        shipped.update({n: namespace[n] for n in shipped if namespace[n] is not shipped[n]})
        shipped.update(carried)
        before.update(cell_changes.digests(carried, sizes=sizes))
        # The notebook's classes it was sent or reaches: their own attributes, as given.
        classes = class_state.snapshot(shipped)
        # The notebook's own objects (not datasets, not values kept on the workers): one
        # the cell changes without rebinding it is written into the notebook's object.
        notebook_objects = {*spec.names, *carried} - set(references)
        # Loaded only now, with the shell (and matplotlib's inline backend) set up: the
        # state holds matplotlib objects, and importing matplotlib first would choose
        # another backend.
        kernel_state = _shipped_state(shell, spec.state) if spec.state else {}
        state_before = _APPLIED.enter(spec.state, kernel_state, again=attempt > 0)
        # The namespace's values but the shell's own (BASE_NS: none is a notebook module
        # or function), which the cell was given as ``shipped``.
        modules_before = module_state.snapshot(
            shipped.values(), [n for n, _ in getattr(spec, "modules", ())]
        )
        _name_cell(shell, spec)
        logs = cell_logging(kernel_state)
        with logs.running():
            result = shell.run_cell(spec.source, store_history=False)
        error = result.error_before_exec or result.error_in_exec
        if error is None or attempt == spec.retries or not isinstance(error, Exception):
            break
        _drop_changed(references, shipped, kept_before)
        print(
            f"retrying the cell ({attempt + 1}/{spec.retries}) after "
            f"{type(error).__name__}: {error}",
            file=sys.stderr,
        )
    effects = cell_changes.effects(namespace, shipped, before, spec, references)
    out = effects["out"]
    # Changed in place: with the size the notebook holds of each.
    effects["in_place"] = {
        n: sizes.get(n, 0) for n in notebook_objects if n in out and out[n] is shipped[n]
    }
    _add_kept(effects, namespace, shipped, before, references, rehomed)
    effects["kept_read"] = kept_read  # named by their references where the values hold them
    effects["state"] = _APPLIED.leave(spec.state, state_before) | logs.changes()
    effects["modules_changed"] = module_state.changed(modules_before)
    effects["classes_changed"] = class_state.changes(classes)
    if error is not None:
        raise _from_cell(error, spec.filename, cell_values.pack(effects, spec, plain=False))
    shown, shows = result.result, getattr(spec, "shows", "")  # "": an older kernel's spec
    if not shows or shown is None or spec.plain:
        return cell_values.pack(effects, spec, plain=spec.plain)
    datasets = datasets or {}
    unchanged = {n: v for n, v in shipped.items() if n not in datasets and namespace.get(n) is v}
    same = cell_values.name_of(shown, [effects["out"], unchanged])
    packed = cell_values.pack(effects, spec, plain=False)
    packed["shown"] = cell_values.shown_value(
        shown, same, packed["skipped"], spec, effects["inside"]
    )
    return packed


def _name_cell(shell: Any, spec: CellSpec) -> None:
    """Have the shell compile and show the cell under its name and text in the notebook."""
    shell.compile.cell_filename = spec.filename
    shell.compile.line_offset = spec.line_offset
    shell.displayhook.cell_source = spec.source
    shell.kernel_transform = (spec.source, getattr(spec, "python", ""))  # "": older kernel


def prepare_cell(spec: CellSpec) -> None:
    """Make this process's shell and load the notebook's state ``spec`` ships (imports).

    Done before the cell runs (:meth:`~nbtask.notebook.celltask.CellTask.before_start`),
    where a terminate waits for it. Imports are never cut in half anywhere (the worker's
    interrupts wait for them to end), but making the shell is more than imports: cut,
    it would leave a half-made shell to the process's later cells. :func:`execute_cell`
    then finds both ready.

    First, before anything here imports the modules the cell uses, it says which of the
    notebook's own modules this process has another copy of (see
    :func:`~nbtask.notebook.module_code.say_which_differ`).
    """
    say_which_differ(getattr(spec, "modules", ()))  # (): an older kernel's spec
    shell = worker_shell()
    if spec.state:
        _shipped_state(shell, spec.state)


def _shipped_state(shell: Any, pickled: bytes) -> Any:
    """The kernel's state a cell was shipped with, unpickled once per distinct pickle.

    A notebook's cells mostly ship the same state one after another. Applying it never
    hands its values themselves to the process (see :func:`process_state.apply`), so
    the loaded state is kept for the next cell.
    """
    last, state = shell.shipped_state
    if pickled != last:
        state = Envelope({}, pickled).load_body()
        shell.shipped_state = (pickled, state)
    return state


def _resolve_all(
    shipped: dict[str, Any], references: Mapping[str, RemoteValue], inside: bool
) -> tuple[dict[str, list[Any]], dict[str, bytes], dict[int, cell_values.ReadKept]]:
    """The kept values shipped, named or held inside containers, replaced by the values.

    ``inside``: whether the containers may hold any (else they are not looked into).
    Returns :func:`_resolve_kept`'s, and every kept value the cell got so, by id.
    """
    rehomed, by_content = _resolve_kept(shipped)
    read = _resolve_inside(shipped, references) if inside else {}
    for name, reference in references.items():
        read[id(shipped[name])] = (shipped[name], reference, by_content[name].decode())
    return rehomed, by_content, read


def _resolve_kept(shipped: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, bytes]]:
    """Replace shipped references to values kept on the workers by the values, in place.

    A value this process holds is used as it is (no blob is read); any other is loaded
    from its store copy, and then held here too. Returns those now held here:
    ``{name: [key, this process's own queue, pid]}``, so the notebook sends later work
    on them here; and each value's key by content (what tells that the cell changed it).
    """
    rehomed: dict[str, list[Any]] = {}
    by_content: dict[str, bytes] = {}
    holding = cell_values.holding_here()
    first: dict[int, str] = {}  # names bound to one reference get one value, as locally
    for name, reference in shipped.items():
        if not isinstance(reference, RemoteValue):
            continue
        same = first.setdefault(id(reference), name)
        if same != name:
            shipped[name], by_content[name] = shipped[same], by_content[same]
            if same in rehomed:
                rehomed[name] = rehomed[same]
            continue
        value, content, held_here = _kept_value(name, reference)
        shipped[name], by_content[name] = value, content.encode()
        here = [reference.key, holding.queue if holding else "", os.getpid()]
        if held_here and [reference.holder, reference.holder_pid] != here[1:]:
            rehomed[name] = here  # held here since, which the notebook did not know
    return rehomed, by_content


def _kept_value(name: str, reference: RemoteValue) -> tuple[Any, str, bool]:
    """The value ``reference`` stands for, its key by content, whether this process holds it.

    A value this process holds is used as it is (no blob is read); any other is loaded
    from its store copy, and then held here too.
    """
    holding = cell_values.holding_here()
    key = reference.key
    namers = cell_values.namers_of(reference)  # a re-attached session's cell, say
    held = holding.get(key, namers) if holding is not None else None
    if held is not None:
        return held.value, held.key_by_content(key), True
    digests: dict[str, str] = {}  # a sealed value's, checked as it is read
    try:
        value = reference.load(
            cell_values.blob_store().get_blob, cell_values.cell_signer(), digests
        )
    except BlobError as exc:
        made_by = reference.made_by or "the cell that made it"
        holder = reference.holder or "none"
        why = exc.reason if isinstance(exc, BlobGone) else str(exc)  # its remedy is ours
        raise BlobError(
            f"{name} is lost: the worker process that held it ({holder}) is gone or did "
            f"not run this cell, and its store copy cannot be read ({why}). Run {made_by} "
            "again to make it"
        ) from None
    content = key_by_content(reference, digests)
    held = cell_values.held_value(name, value, reference)
    if reference.sealed:
        held.content_key = functools.partial(str, content)
    return value, content, holding is not None and holding.hold(key, held)


def _resolve_inside(
    shipped: dict[str, Any], references: Mapping[str, RemoteValue]
) -> dict[int, cell_values.ReadKept]:
    """Replace the references that shipped values hold by the values, in place.

    A notebook's container may hold kept values (``d = {"k": arr}``, sent back so that
    ``d["k"]`` and ``arr`` are one object; a cell's ``Out``): the cell gets them as their
    values, ``d["k"] is arr`` when it is sent both, as a named one is got
    (:func:`_resolve_kept`). Returns those got so, by id: each with its reference and its
    key by content (the notebook's container gets the reference back while it is so).
    """
    values = {reference.key: shipped[name] for name, reference in references.items()}
    found: dict[int, cell_values.ReadKept] = {}

    def value_of(reference: RemoteValue) -> Any:
        if reference.key not in values:
            value, content, _ = _kept_value(reference.name, reference)
            values[reference.key] = value
            found[id(value)] = (value, reference, content)
        return values[reference.key]

    for name in [n for n in shipped if n not in references]:
        shipped[name] = replace_inside(shipped[name], value_of)
    return found


def _add_kept(
    effects: dict[str, Any],
    namespace: Mapping[str, Any],
    shipped: Mapping[str, Any],
    before: Mapping[str, bytes],
    references: Mapping[str, RemoteValue],
    rehomed: Mapping[str, list[Any]],
) -> None:
    """Add to ``effects`` what became of the kept values the cell read.

    ``kept``: those it left unchanged (see :func:`_unchanged_kept`); ``kept_in_place``:
    those it changed in place (the notebook's other names for them follow); ``held``:
    those this process holds since (see :func:`_resolve_kept`).
    """
    out = effects["out"]
    effects["kept"] = _unchanged_kept(namespace, shipped, before, references, out, rehomed)
    effects["kept_in_place"] = [n for n in references if n in out and out[n] is shipped[n]]
    _forget_changed(references, out, effects["kept"])
    effects["held"] = {n: where for n, where in rehomed.items() if n not in out}


def _forget_changed(
    references: Mapping[str, RemoteValue], out: Mapping[str, Any], unchanged: Kept
) -> None:
    """Stop holding values the cell changed in place: their references name what they were.

    The changed value comes back (kept again, under a reference of its own). One bound
    anew but ``unchanged`` (``x = x``) goes back as its reference: it stays held.
    """
    holding = cell_values.holding_here()
    for name, reference in references.items():
        held = holding.get(reference.key) if holding is not None else None
        if holding is None or held is None or out.get(name) is not held.value:
            continue
        if id(held.value) not in unchanged:
            holding.drop(reference.key)


def _unchanged_kept(
    namespace: Mapping[str, Any],
    shipped: Mapping[str, Any],
    before: Mapping[str, bytes],
    references: Mapping[str, RemoteValue],
    out: Mapping[str, Any],
    rehomed: Mapping[str, list[Any]],
) -> Kept:
    """The kept values the cell read, left unchanged and bound to a name it sends back.

    ``{id(value): (name read, its reference)}``: a name bound to one (``alias = big``) is
    sent back as that reference, not kept a second time; the notebook binds it to the
    reference it holds, so both names stand for one value, as locally. One this process
    holds since (``rehomed``) says so: later work on it comes here.
    """
    found: Kept = {}
    sent = {id(value) for value in out.values()}
    for name, reference in references.items():
        value = shipped[name]
        if id(value) not in sent or id(value) in found:
            continue
        # Still bound to it and not sent back: the cell's check found it unchanged.
        bound = name not in out and namespace.get(name) is value
        if not bound and cell_changes.state(name, value, references) != before[name]:
            continue
        if name in rehomed:
            reference.holder, reference.holder_pid = rehomed[name][1:]
        found[id(value)] = (name, reference)
    return found


def _drop_changed(
    references: Mapping[str, RemoteValue], values: Mapping[str, Any], before: Mapping[str, bytes]
) -> None:
    """Stop holding the kept values a failed try changed in place.

    A retry then loads their store copies: it starts from the values as they were sent, as
    it does from the shipped ones.
    """
    holding = cell_values.holding_here()
    for name, reference in references.items():
        changed = cell_changes.state(name, values[name], references) != before[name]
        if holding is not None and changed:
            holding.drop(reference.key)


#: The worker shell's source files: their frames are left out of a cell's traceback.
_SHELL_FILES = frozenset([worker_shell.__code__.co_filename, refuse_terminal.__code__.co_filename])


def _from_cell(error: BaseException, filename: str, partial: Any) -> BaseException:
    """The cell's exception, its traceback trimmed to start in the cell's code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    # A refusal of the worker's shell (input()) ends at the cell's call, as a kernel's
    # traceback leaves out the kernel's own frames.
    node = tb
    while node is not None and node.tb_next is not None:
        if node.tb_next.tb_frame.f_code.co_filename in _SHELL_FILES:
            node.tb_next = None
        node = node.tb_next
    error = error.with_traceback(tb)
    # An exception type without attributes of its own cannot carry them: they are lost.
    with contextlib.suppress(AttributeError, TypeError):
        setattr(error, PARTIAL_RESULT, partial)
        if tb is not None and not isinstance(error, SyntaxError):  # else its text says all
            setattr(error, SHOWN_TRACEBACK, shown_traceback(error))
        elif isinstance(error, SyntaxError) and error.filename == filename:  # its own line
            setattr(error, SHOWN_TRACEBACK, shown_syntax_error(error))
        if isinstance(error, SyntaxError):  # the notebook shows its frames as IPython does
            frames = traceback.extract_tb(tb)
            setattr(error, CELL_FRAMES, [(f.filename, f.lineno, f.name, f.line) for f in frames])
    if isinstance(error, SyntaxError) and type(error) in (SyntaxError, IndentationError, TabError):
        # Its place travels in its args, which alone travel (not its attributes): a
        # compiler's error (``nonlocal`` at top level) has only its message there.
        place = (error.filename, error.lineno, error.offset, error.text)
        error.args = (error.msg, (*place, error.end_lineno, error.end_offset))
    return error
