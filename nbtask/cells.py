"""Notebook cells as tasks, kernel side: what a cell reads and writes, and shipping it.

:func:`analyze` finds the names a cell reads before assigning them, the names it assigns
and those it may change in place; :func:`prepare` checks and pickles the values it reads
before anything is sent (the pre-send check) and builds a :class:`CellSpec`.

The worker side (running the cell in an IPython shell) is :mod:`nbtask.cellshell`; the
tasks that carry cells (:class:`~nbtask.celltask.CellRunner`, named cells) are
:mod:`nbtask.celltask`. Nothing here imports IPython, so this module imports cheaply.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import os
import sys
import types
from collections.abc import Container, Iterable, Mapping
from typing import Any

import cloudpickle

from nbtask.envelope import Envelope, dumps
from nbtask.errors import NbtaskError

__all__ = [
    "CellAnalysis",
    "CellError",
    "CellSpec",
    "analyze",
    "load_values",
    "prepare",
]

# Method names that change their receiver: `xs.append(1)` makes `xs` an output of the cell.
_MUTATORS = frozenset(
    [
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "update",
        "setdefault",
        "popitem",
        "sort",
        "reverse",
        "add",
        "discard",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "drop",
        "rename",
        "fillna",
        "set_index",
        "reset_index",
        "sort_values",
        "sort_index",
        "shuffle",
    ]
)
# Names every IPython shell defines; the worker's shell has its own.
_SHELL_NAMES = frozenset({"get_ipython", "exit", "quit", "In", "Out", "_ih", "_oh", "_dh"})
_SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMP_NODES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


class CellError(NbtaskError):
    """The pre-send check refused a cell; nothing was sent."""


@dataclasses.dataclass(frozen=True)
class CellAnalysis:
    """What a cell does with names, found statically.

    Attributes
    ----------
    reads : tuple of str
        Names read before the cell assigns them (in order of first use).
    assigned : tuple of str
        Names the cell binds at top level (assignments, imports, defs, loop targets).
    mutated : tuple of str
        Names whose value the cell may change in place (``df["c"] = ...``, ``xs.append``).
    """

    reads: tuple[str, ...]
    assigned: tuple[str, ...]
    mutated: tuple[str, ...]


def analyze(source: str | ast.Module) -> CellAnalysis:
    """Find the names a cell reads, assigns and may mutate.

    Parameters
    ----------
    source
        Python source (IPython syntax already transformed) or its parsed module.

    Raises
    ------
    SyntaxError
        The source does not parse.
    """
    tree = ast.parse(source) if isinstance(source, str) else source
    scan = _Scan()
    for statement in tree.body:
        scan.visit(statement)
    # Names free in function bodies are read when the function is called: ship them
    # unless the cell itself binds them somewhere.
    late = [n for n in scan.deferred if n not in scan.assigned and n not in scan.reads]
    return CellAnalysis(tuple([*scan.reads, *late]), tuple(scan.assigned), tuple(scan.mutated))


class _Scan(ast.NodeVisitor):
    """Walks top-level statements in evaluation order, tracking nested scopes."""

    def __init__(self) -> None:
        self.reads: dict[str, None] = {}
        self.assigned: dict[str, None] = {}
        self.mutated: dict[str, None] = {}
        self.deferred: dict[str, None] = {}
        self.bound: set[str] = set()
        self.scopes: list[tuple[set[str], set[str]]] = []  # (locals, declared global)
        self.lazy = 0  # inside a function body: reads happen when it is called

    def _load(self, name: str) -> None:
        if any(name in local for local, _ in self.scopes if name not in _):
            return
        if self.lazy:
            self.deferred.setdefault(name)
        elif name not in self.bound:
            self.reads.setdefault(name)

    def _store(self, name: str) -> None:
        if self.scopes and name not in self.scopes[-1][1]:
            return  # a local of a function, class body or comprehension
        self.bound.add(name)
        self.assigned.setdefault(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self._mark_mutated(target)
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self._mark_mutated(node.target)
        self.visit(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
        self.visit(node.value)
        self._mark_mutated(node.target)
        self.visit(node.target)

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self._mark_mutated(target)
            if not isinstance(target, ast.Name):
                self.visit(target)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _MUTATORS:
            self._mark_mutated(func.value, deep=True)
        self.generic_visit(node)

    def _mark_mutated(self, target: ast.expr, deep: bool = False) -> None:
        node: ast.expr = target
        if not deep and isinstance(node, ast.Name):
            return  # rebinding, not mutation
        while isinstance(node, (ast.Subscript, ast.Attribute, ast.Starred)):
            node = node.value
        if isinstance(node, ast.Name) and not self.scopes:
            self.mutated.setdefault(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                self._mark_mutated(element)

    def _loop(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for statement in [*node.body, *node.orelse]:
            self.visit(statement)

    visit_For = visit_AsyncFor = _loop

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._store(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name)
        for statement in node.body:
            self.visit(statement)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self.generic_visit(node)
        if node.name:
            self._store(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._store(node.name)

    def visit_Global(self, node: ast.Global) -> None:
        if self.scopes:
            self.scopes[-1][1].update(node.names)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            self.visit(default)
        body: list[ast.AST] = [node.body] if isinstance(node, ast.Lambda) else [*node.body]
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
            self._store(node.name)
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        declared = _declared_global(body)
        self.scopes.append((params | (_bound_in(body) - declared), declared))
        self.lazy += 1
        for statement in body:
            self.visit(statement)
        self.lazy -= 1
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._store(node.name)
        declared = _declared_global(node.body)
        self.scopes.append((_bound_in(node.body) - declared, declared))
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    def _comprehension(self, node: ast.expr) -> None:
        assert isinstance(node, _COMP_NODES)
        first, *rest = node.generators
        self.visit(first.iter)  # evaluated in the enclosing scope
        targets = _bound_in([g.target for g in node.generators])
        self.scopes.append((targets, set()))
        for expr in first.ifs:
            self.visit(expr)
        for generator in rest:
            self.visit(generator.iter)
            for expr in generator.ifs:
                self.visit(expr)
        parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for part in parts:
            self.visit(part)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def _bound_in(nodes: Iterable[ast.AST]) -> set[str]:
    """Names bound directly in ``nodes``, not inside nested scopes."""
    found: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
            continue
        elif isinstance(node, (ast.Lambda, *_COMP_NODES)):
            continue
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(a.asname or a.name.split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            found.add(node.name)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _declared_global(nodes: Iterable[ast.AST]) -> set[str]:
    found: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif not isinstance(node, (*_SCOPE_NODES, *_COMP_NODES)):
            stack.extend(ast.iter_child_nodes(node))
    return found


# Kernel side: the pre-send check ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CellSpec:
    """Everything a worker needs to run a cell, except the shipped values.

    Attributes
    ----------
    source : str
        The cell as typed (IPython syntax included); the worker's shell transforms it.
    filename : str
        Name the cell's code is compiled under, so tracebacks say ``Cell In[7], line 3``.
    names : tuple of str
        The shipped names, whose in-place changes are looked for.
    assigned : tuple of str
        Names the cell assigns (found statically).
    retries : int
        Rerun the cell this many times after an exception.
    plain : bool
        Return ``{name: value}`` (a named cell's ``.delay``) instead of a packed blob.
    """

    source: str
    filename: str
    names: tuple[str, ...]
    assigned: tuple[str, ...]
    retries: int = 0
    plain: bool = False
    line_offset: int = 0


def prepare(
    source: str,
    python: str,
    namespace: Mapping[str, Any],
    *,
    max_bytes: int,
    filename: str,
    retries: int = 0,
    plain: bool = False,
    overrides: Mapping[str, Any] | None = None,
    hidden: Container[str] = (),
    line_offset: int = 0,
) -> tuple[CellSpec, bytes, CellAnalysis]:
    """Check a cell and pickle its inputs; raise :class:`CellError` before anything is sent.

    Parameters
    ----------
    source
        The cell as typed.
    python
        The same cell transformed to plain Python (``shell.transform_cell``).
    namespace
        Where the values of the names it reads come from (the notebook's ``user_ns``).
    max_bytes
        The broker's message size limit (``settings.max_message_bytes``).
    filename
        The name tracebacks will show for the cell.
    retries, plain
        See :class:`CellSpec`.
    overrides
        Values used instead of the namespace's (a named cell rerun with other inputs).
    line_offset
        See :class:`CellSpec`.
    hidden
        The shell's own names (``get_ipython``, ``In``...): the worker's shell has its own.

    Returns
    -------
    (CellSpec, bytes, CellAnalysis)
        The spec, the pickled ``{name: value}`` of the shipped names, and the analysis.
    """
    try:
        found = analyze(python)
    except SyntaxError as exc:
        raise CellError(f"the cell does not parse: {exc}") from None
    overrides = dict(overrides or {})
    values: dict[str, Any] = {}
    undefined = []
    for name in found.reads:
        if name in overrides:
            values[name] = overrides[name]
        elif name in hidden or name in _SHELL_NAMES:
            continue
        elif name in namespace:
            values[name] = namespace[name]
        elif not hasattr(builtins, name) and name not in found.assigned:
            undefined.append(name)
    unknown = sorted(set(overrides) - set(found.reads))
    if unknown:
        raise CellError(f"the cell does not read {', '.join(map(repr, unknown))}")
    # Magics can bind names the analysis cannot see (``%time v = 3``): let the worker judge.
    if undefined and "get_ipython()" not in python:
        names = ", ".join(repr(n) for n in undefined)
        raise CellError(f"name {names} is not defined in the notebook (the cell reads it)")
    _ship_local_modules(values.values())
    try:
        blob = dumps(values)
    except Exception:
        raise CellError(_unpicklable(values)) from None
    size = len(blob) + len(source.encode())
    if size > max_bytes:
        sizes = sorted(((len(dumps(v)), n) for n, v in values.items()), reverse=True)
        biggest = ", ".join(f"{n!r} ({s / 1e6:.1f} MB)" for s, n in sizes[:3])
        raise CellError(
            f"the cell's inputs are {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB "
            f"message limit (max_message_bytes); the biggest: {biggest}. Load the data "
            "inside the cell (e.g. from a path) instead of shipping it"
        )
    spec = CellSpec(source, filename, tuple(values), found.assigned, retries, plain, line_offset)
    return spec, blob, found


def _unpicklable(values: Mapping[str, Any]) -> str:
    problems = []
    for name, value in values.items():
        try:
            dumps(value)
        except Exception as exc:
            problems.append(
                f"variable {name!r} ({type(value).__module__}.{type(value).__qualname__}) "
                f"cannot be pickled: {exc}"
            )
    detail = "; ".join(problems) or "the shipped values cannot be pickled together"
    return (
        f"{detail}. Nothing was sent. Create such objects inside the cell (open the "
        "connection or file there) or pass something picklable (a path, a plain value)"
    )


def _ship_local_modules(values: Iterable[Any]) -> None:
    """Pickle by value the modules written next to the notebook that the values come from.

    Workers on other machines cannot import them; pickling them by value ships the code.
    """
    for value in values:
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(value, "__module__", None) or type(value).__module__
        module = sys.modules.get(str(name).split(".")[0])
        if module is not None and _is_local(module):
            cloudpickle.register_pickle_by_value(module)


def _is_local(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if (
        not path
        or module.__name__ in ("__main__", "nbtask")
        or module.__name__ in sys.builtin_module_names
    ):
        return False
    path = os.path.abspath(path)
    installed = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(path.startswith(p + os.sep) for p in installed) or "site-packages" in path:
        return False
    return bool(path.startswith(os.path.abspath(os.getcwd()) + os.sep))


def load_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """Unpickle the values a cell sent back (on the kernel's main thread).

    The blob is part of a result whose envelope was verified by the listener.
    """
    blob = result.get("values", b"")
    values: dict[str, Any] = Envelope({}, blob).load_body() if blob else {}
    return values
