"""Names a cell reaches without spelling them as names: inside magics, through ``globals()``.

For a cell's analysis (:mod:`nbtask.notebook.analysis`). IPython turns ``%time y = x **
2`` into ``get_ipython().run_line_magic('time', 'y = x ** 2')``, ``%%time`` into
``run_cell_magic('time', '', body)`` and ``!echo $x`` into ``get_ipython().system('echo
$x')``: the code the magic runs, and the names its shell expansion reads, are strings.
:func:`magic_of` finds them, as a kernel would use them:

* the statements the code magics run (``%time``, ``%timeit``, ``%prun``, ``%%time``,
  ``%%timeit``, ``%%prun``, ``%%capture``), and the name ``%%capture out`` binds;
* the names IPython's variable expansion reads (``$name``, ``{expr}``) in a shell command
  (``!cmd``, ``v = !cmd``) and in the argument line of any magic that expands it;
* the scripts ``%run -i`` runs in the notebook's namespace.

A cell can also bind and read names through its namespace as a mapping
(``globals()["gx"] = 42``): :func:`writes_namespace`, :func:`namespace_key`; test whether
one is defined (``"x" in globals()``): :func:`defined_test`; and name them in strings it
runs as code (``exec("y = x + 1")``): :func:`code_string`, or may evaluate
(``display('df1')``): :func:`names_in_expression`.

Nothing here imports IPython until a cell holds a magic or shell command that needs it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import shlex
from typing import Any

__all__ = [
    "Magic",
    "code_string",
    "defined_test",
    "expanded_names",
    "magic_of",
    "names_in_expression",
    "namespace_key",
    "writes_namespace",
]

# Magics running code in the notebook's namespace, and the options each takes: letters
# followed by ":" take a value (IPython's ``parse_options`` specs).
_CODE_LINE = {"time": "", "timeit": "n:r:tcp:qo", "prun": "D:l:rs:T:q"}
_CODE_CELL = {"time": "", "timeit": "n:r:tcp:qo", "prun": "D:l:rs:T:q", "capture": ""}
# Those whose line IPython passes as typed (``@no_var_expand``), unexpanded.
_UNEXPANDED = frozenset({"time", "timeit", "prun", "debug"})
# ``%run``'s options (``-i``: the script runs in the notebook's namespace).
_RUN_OPTIONS = "nidtN:b:pD:l:rs:T:em:G"
_SHELL_CALLS = frozenset({"system", "getoutput"})
_MAX_CODE = 100_000
_WORD = re.compile(r"[A-Za-z_]\w*")
# Calls returning the namespace a cell binds its names in (``locals()``, ``vars()`` only
# at top level: in a function they are its own).
_NAMESPACE_CALLS = frozenset({"globals", "locals", "vars"})
# ``"x" in globals()``: a test of whether the notebook defines ``x``.
_TEST_CALLS = frozenset({"globals", "locals", "dir", "vars"})
# Calls whose string argument is code, maybe statements: ``exec("y = x + 1")``.
_CODE_CALLS = frozenset({"exec", "eval", "compile"})
_MAX_STATEMENTS = 5_000
_MAX_EXPRESSION = 500  # longer strings passed to calls are text, not code


def writes_namespace(call: ast.Call, top_level: bool) -> bool:
    """Whether ``call`` returns the cell's namespace (``globals()``).

    Through it the cell may bind and read names unseen.
    """
    func = call.func
    if not isinstance(func, ast.Name) or call.args or call.keywords:
        return False
    return func.id == "globals" or (top_level and func.id in _NAMESPACE_CALLS)


def namespace_key(node: ast.Subscript, top_level: bool) -> str | None:
    """``"gx"`` for ``globals()["gx"]``: the name the cell reaches through its namespace."""
    key = node.slice
    if (
        isinstance(node.value, ast.Call)
        and writes_namespace(node.value, top_level)
        and isinstance(key, ast.Constant)
        and isinstance(key.value, str)
        and key.value.isidentifier()
    ):
        return key.value
    return None


def defined_test(test: ast.expr) -> tuple[str | None, bool]:
    """``("x", True)`` for ``"x" in globals()``, ``("x", False)`` for ``not in``."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None, False
    left, op, right = test.left, test.ops[0], test.comparators[0]
    if not (
        isinstance(left, ast.Constant)
        and isinstance(left.value, str)
        and isinstance(op, (ast.In, ast.NotIn))
        and isinstance(right, ast.Call)
        and isinstance(right.func, ast.Name)
        and right.func.id in _TEST_CALLS
        and not right.args
    ):
        return None, False
    return left.value, isinstance(op, ast.In)


def code_string(call: ast.Call) -> str | None:
    """``"y = x + 1"`` for ``exec("y = x + 1")``: the code a call runs, if constant."""
    func, first = call.func, call.args[0] if call.args else None
    if (
        isinstance(func, ast.Name)
        and func.id in _CODE_CALLS
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
        and len(first.value) <= _MAX_STATEMENTS
    ):
        return first.value
    return None


def names_in_expression(text: str) -> list[str]:
    """The names a string would read if evaluated (``'df1'``, ``"pd.merge(a, b)"``)."""
    if len(text) > _MAX_EXPRESSION or not text.strip():
        return []
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return []  # prose, a path, a format string: not code
    return [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]


@dataclasses.dataclass(frozen=True)
class Magic:
    """What one magic call reads and binds.

    Attributes
    ----------
    code : tuple of ast.stmt
        The statements it runs in the notebook's namespace, in order.
    timed : tuple of tuple of ast.stmt
        Statements it runs in a scope of their own (``%timeit``: what they bind is theirs,
        what they read is the notebook's).
    expanded : tuple of str
        Names it reads only when the notebook defines them: its shell expansion (``$x``,
        ``{x + 1}``: expanded when defined, left as typed otherwise, as IPython does), the
        names ``%store`` saves.
    binds : tuple of str
        Names the magic itself binds (``%%capture out``).
    scripts : tuple of str
        Files it runs in the notebook's namespace (``%run -i script.py``), as named.
    """

    code: tuple[ast.stmt, ...] = ()
    timed: tuple[tuple[ast.stmt, ...], ...] = ()
    expanded: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()


def magic_of(call: ast.Call) -> Magic | None:
    """What the magic ``call`` (``get_ipython().run_line_magic(...)``...) reads and binds.

    ``None`` if ``call`` is not one with constant arguments.
    """
    func = call.func
    if not (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
        and not func.value.args
    ):
        return None
    args = [a.value if isinstance(a, ast.Constant) else None for a in call.args]
    if not args or not all(isinstance(a, str) for a in args):
        return None
    texts: list[str] = [a for a in args if isinstance(a, str)]
    if func.attr in _SHELL_CALLS:
        return Magic(expanded=expanded_names(texts[0]))
    if func.attr == "run_line_magic" and len(texts) == 2:
        name, line = texts
        return _line_magic(name, line)
    if func.attr == "run_cell_magic" and len(texts) == 3:
        name, line, body = texts
        return _cell_magic(name, line, body)
    return None


def _line_magic(name: str, line: str) -> Magic:
    if name == "run":
        return _run_magic(line)
    if name == "store":
        return _store_magic(line)
    if name not in _CODE_LINE:
        return Magic(expanded=() if name in _UNEXPANDED else expanded_names(line))
    code = _parsed(_after_options(line, _CODE_LINE[name]))
    if name == "timeit":
        return Magic(timed=(code,))
    return Magic(code=code)


def _store_magic(line: str) -> Magic:
    """``%store x y`` and ``%store x > file`` read ``x`` (and ``y``): the values, as locally.

    Its options (``-r``, ``-d``, ``-z``) read no name of the notebook.
    """
    words = line.split()
    if not words or words[0].startswith("-"):
        return Magic()
    stored = words[: next((i for i, w in enumerate(words) if w.startswith(">")), len(words))]
    return Magic(expanded=tuple(w for w in stored if _WORD.fullmatch(w)))


def _cell_magic(name: str, line: str, body: str) -> Magic:
    expanded = () if name in _UNEXPANDED else expanded_names(line)
    if name not in _CODE_CELL:
        return Magic(expanded=expanded)
    if name == "capture":
        # ``%%capture [--no-stdout] [--no-stderr] [--no-display] [output]``
        words = [w for w in line.split() if not w.startswith("-")]
        binds = tuple(w for w in words[-1:] if _WORD.fullmatch(w))
        return Magic(code=_parsed(body), expanded=expanded, binds=binds)
    rest = _after_options(line, _CODE_CELL[name])
    if name == "timeit":  # the rest of the line is setup code, run before the body
        return Magic(timed=(_parsed(f"{rest}\n{body}"),), expanded=expanded)
    if name == "prun":
        return Magic(code=_parsed(f"{rest}\n{body}"), expanded=expanded)
    return Magic(code=_parsed(body), expanded=expanded)


def _parsed(code: str) -> tuple[ast.stmt, ...]:
    """The statements of ``code``, IPython's syntax in it transformed; none if not code."""
    if len(code) > _MAX_CODE or not code.strip():
        return ()
    try:
        return tuple(ast.parse(code).body)
    except (SyntaxError, ValueError):
        pass
    try:
        return tuple(ast.parse(_transformer()(code)).body)
    except Exception:  # not code after all: the worker says so, as a kernel would
        return ()


@functools.cache
def _transformer() -> Any:
    """IPython's transform of its syntax to Python (``%time``, ``!cmd`` in a magic's code)."""
    from IPython.core.inputtransformer2 import TransformerManager  # noqa: PLC0415 - heavy

    return TransformerManager().transform_cell


def _after_options(line: str, spec: str) -> str:
    """``line`` without the leading options of ``spec`` (``-n 3 -r 1 arr.sum()``)."""
    return _options(line, spec)[1]


def _options(line: str, spec: str) -> tuple[str, str]:
    """The option letters ``line`` starts with, of those of ``spec``, and what follows."""
    rest, seen = line.lstrip(), ""
    while rest.startswith("-") and len(rest) > 1 and not rest[1].isspace():
        token, _, after = rest.partition(" ")
        if token == "--":
            return seen, after.lstrip()
        letters = token[1:]
        for i, letter in enumerate(letters):
            at = spec.find(letter) if letter != ":" else -1
            if at < 0:
                return seen, rest  # not one of its options: the code starts here
            seen += letter
            if spec[at + 1 : at + 2] == ":":
                if i == len(letters) - 1:  # its value is the next word
                    _, _, after = after.lstrip().partition(" ")
                break
        rest = after.lstrip()
    return seen, rest


def _run_magic(line: str) -> Magic:
    """``%run -i script.py``: the script runs in the notebook's namespace, reading its names.

    Named here, read where the cell is sent from (the file may change between runs).
    """
    letters, rest = _options(line, _RUN_OPTIONS)
    try:
        words = shlex.split(rest)
    except ValueError:  # unbalanced quotes: %run says so on the worker
        words = []
    scripts = tuple(words[:1]) if "i" in letters and "m" not in letters else ()
    return Magic(expanded=expanded_names(line), scripts=scripts)


def expanded_names(text: str) -> tuple[str, ...]:
    """The names IPython's variable expansion of ``text`` reads (``$x``, ``{x + 1}``)."""
    if "$" not in text and "{" not in text:
        return ()
    from IPython.utils.text import DollarFormatter  # noqa: PLC0415 - heavy

    names: dict[str, None] = {}
    try:
        fields = [field for _, field, _, _ in DollarFormatter().parse(text) if field]
    except Exception:  # unbalanced braces: IPython leaves the text as typed
        return ()
    for field in fields:
        try:
            tree = ast.parse(field.strip(), mode="eval")
        except (SyntaxError, ValueError):
            continue
        names.update(dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name)))
    return tuple(names)
