"""What a cell does with names, found statically: what it reads, assigns and may mutate.

Nothing here imports IPython, so this module imports cheaply.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import sys
from collections.abc import Iterable

from nbtask.notebook.indirect_names import (
    Magic,
    code_string,
    defined_test,
    magic_of,
    names_in_expression,
    namespace_key,
    writes_namespace,
)

__all__ = ["SHELL_NAMES", "CellAnalysis", "analyze", "is_history_name"]

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
#: Names every IPython shell defines; the worker's shell has its own.
SHELL_NAMES = frozenset({"get_ipython", "exit", "quit", "In", "Out", "_ih", "_oh", "_dh"})
_HISTORY_NAMES = frozenset({"_", "__", "___", "_i", "_ii", "_iii", "In", "Out", "_ih", "_oh"})
_SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMP_NODES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
# Handlers that catch a NameError: ``except NameError``, ``except Exception``, bare.
_CATCH_NAME_ERROR = frozenset({"NameError", "Exception", "BaseException"})


def is_history_name(name: str) -> bool:
    """Whether ``name`` is one of IPython's input and output history names.

    ``_``, ``__``, ``___``, ``_3``, ``_i``, ``_i3``, ``In``, ``Out``...: a cell reads the
    notebook's, never the worker shell's, and never sends them back.
    """
    if name in _HISTORY_NAMES:
        return True
    return name[:1] == "_" and (name[1:].isdigit() or (name[:2] == "_i" and name[2:].isdigit()))


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
    late : tuple of str
        Those of ``reads`` read only inside function bodies: read when the function is
        called, so they may be defined later, as in plain Python.
    imports : tuple of str
        Top-level packages the cell imports.
    star_imports : tuple of str
        Modules the cell imports ``*`` from (their names are bound, unseen here).
    named_strings : tuple of str
        Names read by string constants shaped like expressions passed to calls
        (``display('df1')``, ``eval("pd.merge(a, b)")``): names the cell may reach
        through a string.
    deleted : tuple of str
        Names a top-level ``del`` statement unbinds: gone from the notebook too if the
        cell ends without them.
    guarded : tuple of str
        Those of ``reads`` read only where the cell expects them maybe undefined: in the
        body of a ``try`` whose handlers catch ``NameError``, or under ``if "x" in
        globals()``. Shipped when defined, never refused: the cell handles their absence.
    namespace : bool
        Whether the cell reaches its namespace as a mapping (``globals()['x'] = 1``,
        ``vars()``, ``locals()`` at top level): it may bind and read names unseen here.
    scripts : tuple of str
        Files the cell runs in its namespace (``%run -i script.py``), as named.
    """

    reads: tuple[str, ...]
    assigned: tuple[str, ...]
    mutated: tuple[str, ...]
    late: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    star_imports: tuple[str, ...] = ()
    named_strings: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    guarded: tuple[str, ...] = ()
    namespace: bool = False
    scripts: tuple[str, ...] = ()


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
    if isinstance(source, str):
        return _analyze_text(source)
    return _analyze_tree(source)


@functools.lru_cache(maxsize=256)
def _analyze_text(source: str) -> CellAnalysis:
    # A cell is analysed on each run, and more than once per run (the check before
    # sending, the pending names): by its text, which is all the analysis depends on.
    # What parses but does not compile ('return' or 'yield' outside a function) is not
    # refused here: a kernel compiles and runs a cell one statement at a time, so the
    # statements before that one run first, and so they do on the worker.
    return _analyze_tree(ast.parse(source))


def _analyze_tree(tree: ast.Module) -> CellAnalysis:
    scan = _Scan()
    for statement in tree.body:
        scan.visit(statement)
    # Names free in function bodies are read when the function is called: ship them
    # unless the cell binds them at its top level. One bound only by a function that
    # declares it ``global`` (``counter += 1``) may be read before that function binds it.
    late = [n for n in scan.deferred if n not in scan.top_level and n not in scan.reads]
    return CellAnalysis(
        tuple([*scan.reads, *late]),
        tuple(scan.assigned),
        tuple(scan.mutated),
        tuple(late),
        tuple(scan.imports),
        tuple(scan.star_imports),
        tuple(scan.named_strings),
        tuple(scan.deleted),
        tuple(n for n in scan.guarded if n not in scan.unguarded),
        scan.namespace,
        tuple(scan.scripts),
    )


class _Scan(ast.NodeVisitor):
    """Walks top-level statements in evaluation order, tracking nested scopes."""

    def __init__(self) -> None:
        self.reads: dict[str, None] = {}
        self.assigned: dict[str, None] = {}
        self.top_level: set[str] = set()  # of those, bound outside every function
        self.mutated: dict[str, None] = {}
        self.deferred: dict[str, None] = {}
        self.bound: set[str] = set()
        self.scopes: list[tuple[set[str], set[str]]] = []  # (locals, declared global)
        self.lazy = 0  # inside a function body: reads happen when it is called
        self.imports: dict[str, None] = {}
        self.star_imports: dict[str, None] = {}
        self.named_strings: dict[str, None] = {}
        self.deleted: dict[str, None] = {}
        # Reads where the cell expects a NameError (counted), or tests for one name.
        self.catching = 0
        self.tested: list[str] = []
        self.guarded: dict[str, None] = {}
        self.unguarded: set[str] = set()
        self.namespace = False
        self.scripts: dict[str, None] = {}

    def _load(self, name: str) -> None:
        if any(name in local for local, _ in self.scopes if name not in _):
            return
        if self.lazy:
            self.deferred.setdefault(name)
        elif name not in self.bound:
            self.reads.setdefault(name)
            if self.catching or name in self.tested:
                self.guarded.setdefault(name)
            else:
                self.unguarded.add(name)

    def _store(self, name: str) -> None:
        if self.scopes and name not in self.scopes[-1][1]:
            return  # a local of a function, class body or comprehension
        self.bound.add(name)
        self.assigned.setdefault(name)
        if not self.lazy:
            self.top_level.add(name)

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
        self._annotation(node.annotation)
        self._mark_mutated(node.target)
        self.visit(node.target)

    def _annotation(self, node: ast.expr | None) -> None:
        # Evaluated at definition unless ``from __future__ import annotations`` is in
        # effect (maybe from an earlier cell): shipped when defined, never refused.
        if node is not None:
            self.lazy += 1
            self.visit(node)
            self.lazy -= 1

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
            elif not self.scopes:
                # Unbinding a notebook name needs it bound: shipped as if read.
                self._load(target.id)
                self.deleted.setdefault(target.id)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _MUTATORS:
            self._mark_mutated(func.value, deep=True)
        for arg in node.args:
            value = arg.value if isinstance(arg, ast.Constant) else None
            if isinstance(value, str):
                self.named_strings.update(dict.fromkeys(names_in_expression(value)))
        if (code := code_string(node)) is not None:  # ``exec('y = x + 1')``: reads x
            with contextlib.suppress(SyntaxError, ValueError):  # not code after all
                self.named_strings.update(dict.fromkeys(_analyze_text(code).reads))
        self.namespace |= writes_namespace(node, not self.scopes)
        if (magic := magic_of(node)) is not None:
            self._magic(magic)
        self.generic_visit(node)

    def _magic(self, magic: Magic) -> None:
        """What a magic's code reads and binds (``%time y = x ** 2``, ``!echo $x``)."""
        for name in magic.expanded:
            self._load_if_defined(name)  # expanded only when defined, as IPython does
        for statement in magic.code:
            self.visit(statement)
        for statements in magic.timed:  # ``%timeit``: in a function scope of its own
            self.scopes.append((_bound_in(statements), set()))
            for statement in statements:
                self.visit(statement)
            self.scopes.pop()
        for name in magic.binds:
            self._store(name)
        self.scripts.update(dict.fromkeys(magic.scripts))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        key = namespace_key(node, not self.scopes)  # ``globals()["gx"] = 42``
        if key is not None and isinstance(node.ctx, ast.Store):
            self._store(key)
        elif key is not None:
            self._load_if_defined(key)  # undefined: a KeyError on the worker, as locally
        self.generic_visit(node)

    def _load_if_defined(self, name: str) -> None:
        self.catching += 1
        self._load(name)
        self.catching -= 1

    def visit_Compare(self, node: ast.Compare) -> None:
        if defined_test(node)[0] is None:  # ``"x" in globals()`` reads only the test
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
        module = node.module if isinstance(node, ast.ImportFrom) else None
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        for alias in node.names:
            if alias.name != "*":
                self._store(alias.asname or alias.name.split(".")[0])
            elif module and not relative and not self.scopes:
                self.star_imports.setdefault(module)
            top = (module or alias.name).split(".")[0]
            if top and not relative:
                self.imports.setdefault(top)

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name)
        for statement in node.body:
            self.visit(statement)

    def visit_Try(self, node: ast.Try) -> None:
        self._try(node.body, node.handlers, [*node.handlers, *node.orelse, *node.finalbody])

    if sys.version_info >= (3, 11):

        def visit_TryStar(self, node: ast.TryStar) -> None:
            self._try(node.body, node.handlers, [*node.handlers, *node.orelse, *node.finalbody])

    def _try(
        self, body: list[ast.stmt], handlers: list[ast.ExceptHandler], rest: list[ast.AST]
    ) -> None:
        catches = any(_catches_name_error(handler.type) for handler in handlers)
        self.catching += catches
        for statement in body:
            self.visit(statement)
        self.catching -= catches
        for part in rest:
            self.visit(part)

    def _branch(self, node: ast.If | ast.IfExp) -> None:
        self.visit(node.test)
        name, defined = defined_test(node.test)
        for branch, guarded in ((node.body, defined), (node.orelse, not defined)):
            if name and guarded:
                self.tested.append(name)
            for part in branch if isinstance(branch, list) else [branch]:
                self.visit(part)
            if name and guarded:
                self.tested.pop()

    visit_If = visit_IfExp = _branch

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
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            for arg in every:
                self._annotation(arg.annotation if arg is not None else None)
            self._annotation(node.returns)
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


def _catches_name_error(handler: ast.expr | None) -> bool:
    """Whether an ``except`` clause of this type catches a ``NameError``."""
    if handler is None:
        return True
    if isinstance(handler, ast.Tuple):
        return any(_catches_name_error(element) for element in handler.elts)
    if isinstance(handler, ast.Attribute):  # builtins.NameError
        return handler.attr in _CATCH_NAME_ERROR
    return isinstance(handler, ast.Name) and handler.id in _CATCH_NAME_ERROR


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
