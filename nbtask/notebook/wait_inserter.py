"""The wait a cell reading pending names starts with, inserted into its code.

An IPython AST transformer: a later cell that reads a name a background cell will assign
first waits for that cell (see :mod:`nbtask.notebook.pending`). The wait is a call in the
cell itself, so the kernel's interrupt stops it like any code.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

from nbtask.notebook.analysis import analyze

if TYPE_CHECKING:
    from nbtask.notebook.pending import Pending

__all__ = ["WAIT_NAME", "WaitInserter"]

#: The name the wait is pushed under into the notebook's namespace (hidden from ``%who``).
WAIT_NAME = "__nbtask_wait__"


def _shown_name(module: ast.Module) -> str | None:
    """The name a cell that is one bare name (``x``: show it) shows; else ``None``."""
    if len(module.body) == 1:
        statement = module.body[0]
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Name):
            return statement.value.id
    return None


class WaitInserter(ast.NodeTransformer):
    """IPython AST transformer: a cell reading pending names first waits for them.

    Pending names are those :meth:`Pending.awaited` finds: assigned or changed by a
    background cell still running, bound to such a name's object, or read by a notebook
    function the cell reads.

    The wait is inserted as the cell's first statement (on its first line, so the cell's
    own line numbers do not move). A cell that assigns a pending name without reading it
    takes the name over: the running task's value will not overwrite it.
    """

    def __init__(self, pending: Pending) -> None:
        self.pending = pending

    def visit(self, node: ast.AST) -> Any:
        """Rewrite a cell's module (IPython calls this once per cell)."""
        pending = self.pending
        if not isinstance(node, ast.Module) or not node.body:
            return node
        if not pending.owner and not pending.holds_kept:
            return node
        found = analyze(node)
        # Names the cell reads without using their values, so a kept one is not fetched:
        # passed to tasks (the worker loads it), fetched by the cell itself (``x.fetch()``,
        # maybe with ``force=True``), deleted, or shown (its preview).
        stay = {n for n in found.reads if _only_as_reference(node, n) or _only_deleted(node, n)}
        stay.update(name for name in [_shown_name(node)] if name is not None)
        kept = set(pending.kept(found.reads)) - stay
        # Containers holding kept values (``d`` of ``d = {"k": arr}``, ``Out``): fetched
        # into, only the items read if the cell reads only some (``Out[5]``).
        holders = [n for n in pending.holding_kept(found.reads) if n not in stay]
        kept.update(holders)
        parts = {n: keys for n in holders if (keys := _items_read(node, n)) is not None}
        # A pending name is waited for all the same: its value (kept or not) comes first;
        # so are names bound to a pending name's object, and those the notebook's functions
        # the cell reads read in turn.
        awaited = pending.awaited(found.reads)
        needed = list(dict.fromkeys([*awaited, *(n for n in found.reads if n in kept)]))
        self.pending.forget(n for n in found.assigned if n not in needed)
        if not needed:
            return node
        staying = sorted(stay.intersection(needed))
        given = f", {parts!r}" if parts else ""
        call = ast.parse(f"{WAIT_NAME}({needed!r}, {staying!r}{given})").body[0]
        first = node.body[0]
        for sub in ast.walk(call):
            if isinstance(sub, (ast.expr, ast.stmt)):
                sub.lineno = sub.end_lineno = first.lineno
                sub.col_offset = sub.end_col_offset = 0
        node.body.insert(0, call)
        return node


#: Calls that send a task, or make a signature of one, with the arguments they are given.
_SENDING_CALLS = frozenset({"delay", "apply_async", "s", "si", "signature"})


def _only_as_reference(cell: ast.Module, name: str) -> bool:
    """True if ``cell`` uses a kept value's reference, not its value, or fetches it itself.

    An argument of a task call goes as a reference: ``f.delay(x)``,
    ``f.apply_async(args=(x,))``, ``f.s([x, y])``, the name as an argument or inside a
    literal list, tuple, set or dict argument. ``f.delay(x.sum())`` reads ``x`` in the
    kernel, so it does not count. A cell calling ``x.fetch()`` fetches it itself: its other
    reads are of what it bound (``x = x.fetch(force=True)``, then ``x.mean()``), and a value
    fetched first would have no ``fetch``.
    """
    used: set[int] = set()
    for node in ast.walk(cell):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr in _SENDING_CALLS:
            for argument in [*node.args, *(keyword.value for keyword in node.keywords)]:
                used.update(id(found) for found in _names_passed(argument, name))
        elif node.func.attr == "fetch" and _names_passed(node.func.value, name):
            return True
    reads = [
        node
        for node in ast.walk(cell)
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)
    ]
    return bool(reads) and all(id(read) in used for read in reads)


def _items_read(cell: ast.Module, name: str) -> list[Any] | None:
    """The constant keys ``cell`` reads ``name`` at (``Out[5]``), if it reads it only so."""
    keys: list[Any] = []
    for node in ast.walk(cell):
        if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)):
            continue
        if node.value.id == name and isinstance(node.slice, ast.Constant):
            keys.append(node.slice.value)
    reads = [
        node
        for node in ast.walk(cell)
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)
    ]
    if len(keys) != len(reads) or not all(isinstance(k, (int, str)) for k in keys):
        return None
    return list(dict.fromkeys(keys))


def _only_deleted(cell: ast.Module, name: str) -> bool:
    """True if ``name`` appears in ``cell`` only as a ``del`` target: its value is not used."""
    uses = [node for node in ast.walk(cell) if isinstance(node, ast.Name) and node.id == name]
    return bool(uses) and all(isinstance(node.ctx, ast.Del) for node in uses)


def _names_passed(argument: ast.expr, name: str) -> list[ast.Name]:
    """``name`` as ``argument`` itself or inside its literal containers, never computed on."""
    if isinstance(argument, ast.Name):
        return [argument] if argument.id == name else []
    if isinstance(argument, ast.Starred):
        return _names_passed(argument.value, name)
    if isinstance(argument, (ast.List, ast.Tuple, ast.Set)):
        return [found for item in argument.elts for found in _names_passed(item, name)]
    if isinstance(argument, ast.Dict):
        items = [value for value in argument.values if value is not None]
        return [found for item in items for found in _names_passed(item, name)]
    return []
