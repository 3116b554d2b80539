"""The IPython shell that runs notebook cells on a worker: one per worker process.

It behaves as a kernel's shell for the cell: magics, ``!cmd``, the last expression's
display, rich output and ``tqdm`` bars, each turned into the task's events instead of
messages to a frontend. What a worker cannot do (a GUI event loop, ``input()``) is
refused with one line saying why.
"""

from __future__ import annotations

import base64
import importlib.abc
import importlib.machinery
import linecache
import os
import sys
import types
from collections.abc import Callable
from typing import Any

from IPython.core.compilerop import CachingCompiler
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.ultratb import AutoFormattedTB, SyntaxTB
from traitlets.config import Config

from nbtask.core.context import current_request, progress
from nbtask.notebook.cell_guards import CellGuards, refuse_terminal

__all__ = ["BASE_NS", "fresh_namespace", "shown_syntax_error", "shown_traceback", "worker_shell"]

#: nbtask's own source files (this module's package's package).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SHELL: Any = None  # the worker's one IPython shell, made on first use in this process
#: The names every cell's namespace starts with (the shell's own).
BASE_NS: dict[str, Any] = {}
#: Whether each recently run cell (as Python) runs as a coroutine; up to this many cells.
_ASYNC_CELLS: dict[str, bool] = {}
_ASYNC_CELLS_KEPT = 256


def worker_shell() -> Any:
    """The worker shell of the calling process, made on first use."""
    global _SHELL  # noqa: PLW0603 - one shell per worker process, made lazily
    if _SHELL is None:
        _SHELL = _make_shell()
        BASE_NS.update(_SHELL.user_ns)
    return _SHELL


#: The threads of tasks alive as the last cell began (see :func:`fresh_namespace`).
_THREADS_AT_LAST_CELL: set[int | None] = set()


def fresh_namespace(shell: Any, *, threads: set[int | None]) -> dict[str, Any]:
    """Give ``shell`` a new namespace for the next cell, holding only :data:`BASE_NS`.

    A new dict, not the last cell's emptied: the functions a cell defined have that dict as
    their globals, so a thread the cell left running (a ``threading.Timer``, a pool's, a
    library's that calls the cell back) goes on reading and writing its own cell's names,
    as in a kernel, and never the next cell's, which may be another notebook's. Whatever
    of IPython looks up the namespace (``exec``'s globals, the display hook's ``_``,
    ``%who``, ``sys.modules["__main__"]`` that ``pickle`` finds the cell's names in) is
    given the new one.

    ``threads``: the threads of tasks alive now. When none of them began since the last
    cell began (none was started by it), the last namespace is emptied at once, so its
    values are freed now, not whenever the garbage collector gets to them (a function it
    holds refers back to it). A thread an earlier cell left running keeps only its own.
    """
    empty_last = not threads - _THREADS_AT_LAST_CELL
    _THREADS_AT_LAST_CELL.clear()
    _THREADS_AT_LAST_CELL.update(threads)
    last, last_module = shell.user_ns, shell.user_module
    module = types.ModuleType("__main__")
    namespace: dict[str, Any] = module.__dict__
    namespace.update(BASE_NS)
    shell.user_module, shell.user_ns = module, namespace
    shell.ns_table["user_global"] = shell.ns_table["user_local"] = namespace
    if sys.modules.get("__main__") is last_module:
        sys.modules["__main__"] = module
    if empty_last:
        last.clear()
    return namespace


def _make_shell() -> Any:
    # Figures are drawn by the same inline backend a kernel uses, shown when the cell ends.
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    class Publisher(DisplayPublisher):  # type: ignore[misc]
        def publish(self, data: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> None:
            bundle: dict[str, Any] = {
                "data": _jsonable(data),
                "metadata": _jsonable(metadata or {}),
            }
            for key in ("transient", "update"):
                if kwargs.get(key):
                    bundle[key] = _jsonable(kwargs[key])
            _emit_display(bundle)

        def clear_output(self, wait: bool = False) -> None:
            _emit_display({"data": {}, "metadata": {}, "clear": True, "wait": bool(wait)})

    class Hook(DisplayHook):  # type: ignore[misc]
        cell_source = ""
        #: A plain attribute, not IPython's trait: set twice per cell, and traitlets'
        #: checks and change notices (nothing here listens) cost a tenth of a trivial cell.
        exec_result: Any = None
        #: While the last expression is shown: the tracebacks of its failing formatters
        #: (a ``__repr__`` that raises), sent with its display rather than as the cell's
        #: stderr. The notebook shows the value with its own formatters, which fail there
        #: as they would for a local cell; these are shown only where it cannot.
        format_errors: list[str] | None = None

        def quiet(self) -> bool:
            return bool(self.semicolon_at_end_of_expression(self.cell_source))

        def start_displayhook(self) -> None:
            self.format_errors = []

        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: Any, md_dict: Any = None) -> None:
            own: dict[str, Any] = {"execute_result": True}
            if self.format_errors:
                own["format_error"] = "".join(self.format_errors)
                self.format_errors = []
            metadata = {**_jsonable(md_dict or {}), "nbtask": own}
            _emit_display({"data": _jsonable(format_dict), "metadata": metadata})

        def finish_displayhook(self) -> None:
            if self.format_errors:  # no formatter gave anything: the errors alone
                self.write_format_data({})
            self.format_errors = None

    class Compiler(CachingCompiler):  # type: ignore[misc]
        cell_filename = "<cell>"

        line_offset = 0

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return self.cell_filename

        def format_code_name(self, name: str) -> tuple[str, str] | None:
            # A cell's frames read "Cell In[7], line 3" in tracebacks, as in the kernel.
            label, _, cell = name.partition(" ")
            if label == "Cell" and cell.startswith("In["):
                return label, cell
            return super().format_code_name(name)  # type: ignore[no-any-return]

        # Shift line numbers (and the cached source) so tracebacks match the notebook's cell.
        def cache(self, transformed_code: str, number: int = 0, raw_code: Any = None) -> str:
            padded = "\n" * self.line_offset + transformed_code
            return str(super().cache(padded, number, raw_code))

        def ast_parse(self, source: str, filename: str = "<unknown>", symbol: str = "exec") -> Any:
            # Parsed after blank lines, as cached: the numbers come out shifted, in about
            # half the time of shifting every node after (ast.increment_lineno).
            return super().ast_parse("\n" * self.line_offset + source, filename, symbol)

    class WorkerShell(InteractiveShell):  # type: ignore[misc]
        displayhook_class = Hook
        display_pub_class = Publisher
        #: The process-wide state the last cell was shipped with: its pickle, and loaded.
        shipped_state: tuple[bytes, Any] = (b"", None)
        #: The cell about to run and the kernel's transform of it, used instead of
        #: transforming it again here (the kernel's is what the cell means there).
        kernel_transform: tuple[str, str] = ("", "")
        #: Plain attributes, not IPython's traits: set for every cell (see Hook.exec_result).
        last_execution_succeeded: bool = True
        last_execution_result: Any = None

        def transform_cell(self, raw_cell: str) -> str:
            source, python = self.kernel_transform
            if python and raw_cell == source:
                return python
            return str(super().transform_cell(raw_cell))

        def should_run_async(
            self,
            raw_cell: str,
            *,
            transformed_cell: str | None = None,
            preprocessing_exc_tuple: Any = None,
        ) -> bool:
            # IPython compiles the whole cell once more to tell (top-level await), each
            # time it runs: remembered per cell, as its code does not change.
            if not self.autoawait or transformed_cell is None or preprocessing_exc_tuple:
                return bool(
                    super().should_run_async(
                        raw_cell,
                        transformed_cell=transformed_cell,
                        preprocessing_exc_tuple=preprocessing_exc_tuple,
                    )
                )
            known = _ASYNC_CELLS.get(transformed_cell)
            if known is None:
                known = bool(super().should_run_async(raw_cell, transformed_cell=transformed_cell))
                if len(_ASYNC_CELLS) >= _ASYNC_CELLS_KEPT:
                    _ASYNC_CELLS.clear()
                _ASYNC_CELLS[transformed_cell] = known
            return known

        def run_cell(self, *args: Any, **kwargs: Any) -> Any:
            with CellGuards():
                return super().run_cell(*args, **kwargs)

        def showtraceback(self, *args: Any, **kwargs: Any) -> None:
            kind, value, tb = sys.exc_info()
            # The cell's own exception, sys.exit() included (IPython shows that one apart):
            # re-raised to the client instead, which shows it as a kernel does.
            if kwargs.get("running_compiled_code") or isinstance(value, SystemExit):
                return
            # A statement of the cell that parses but does not compile ('return' outside a
            # function), once those before it ran, as a kernel runs them: raised too.
            if isinstance(value, SyntaxError) and value.filename == self.compile.cell_filename:
                return
            # Anything else (a failing _repr_html_, say) is shown, as a kernel shows it.
            if value is None:
                return
            structured = self.InteractiveTB.structured_traceback(kind, value, tb)
            text = self.InteractiveTB.stb2text(structured) + "\n"
            if self.displayhook.format_errors is not None:  # the last expression's
                self.displayhook.format_errors.append(text)
            else:
                sys.stderr.write(text)

        def showsyntaxerror(self, *args: Any, **kwargs: Any) -> None:
            pass

        def enable_gui(self, gui: str | None = None) -> None:
            _refuse_screen(gui)

        def enable_matplotlib(self, gui: str | None = None) -> Any:
            _refuse_screen(gui)  # before matplotlib tries to import a GUI toolkit
            return super().enable_matplotlib(gui)

        def raw_input(self, prompt: str = "") -> str:
            refuse_terminal("input()")

        def ask_exit(self) -> None:  # what exit() and quit() call
            raise UsageError(
                "exit() would end the notebook's kernel, and a %%task cell runs on a "
                "worker: run it in a cell without %%task"
            )

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.cache_size = 0
    config.InteractiveShell.colors = "NoColor"
    config.InteractiveShell.ast_node_interactivity = "last_expr"
    shell = WorkerShell.instance(config=config)
    shell.compile = Compiler()
    shell.user_ns["input"] = shell.raw_input  # as a kernel replaces it for its cells
    _install_tqdm()
    return shell


def shown_traceback(error: BaseException) -> list[str]:
    """``error``'s traceback as a kernel shows it: IPython's coloured lines (ANSI).

    The frames of the cell's own code read ``Cell In[7], line 3`` with the lines around
    the failing one, as when the cell runs in the kernel. The kernel's colours
    (``Neutral``), whatever the worker shell's (no colours: what it writes is text).
    Empty when a frame's source cannot be read here.
    """
    chained: BaseException | None = error
    while chained is not None:
        tb = chained.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            # A frame of code only the kernel can read (a function of an earlier cell run
            # there), or nbtask's own (a stop, raised in the cell): the text traceback,
            # which the kernel names and fills in, and which leaves nbtask's frames out.
            if filename.startswith(_PACKAGE_DIR) or not linecache.getline(filename, tb.tb_lineno):
                return []
            tb = tb.tb_next
        chained = chained.__cause__ or chained.__context__
    formatter = AutoFormattedTB(mode="Context", color_scheme="Neutral", tb_offset=0)
    try:
        shown = formatter.structured_traceback(type(error), error, error.__traceback__)
    except Exception:  # a frame IPython cannot read: the kernel shows the text then
        return []
    return [str(line) for line in shown]


def shown_syntax_error(error: SyntaxError) -> list[str]:
    """A statement of the cell that does not compile, as a kernel shows it: no frames.

    Its line and a caret under it (``Cell In[7], line 3``), in the kernel's colours.
    """
    shown = SyntaxTB(color_scheme="Neutral").structured_traceback(type(error), error, [])
    return [str(line) for line in shown]


def _refuse_screen(gui: str | None) -> None:
    if gui not in (None, "inline"):
        raise UsageError(
            f"a worker has no screen: %matplotlib {gui} cannot open windows there. "
            "Use %matplotlib inline (figures come back as images)"
        )


def _emit_display(bundle: dict[str, Any]) -> None:
    request = current_request()
    if request is not None and request.emit is not None:
        request.emit("display", bundle)


def _jsonable(value: Any) -> Any:
    """MIME data as JSON: bytes become base64 text, as a kernel would send them."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _install_tqdm() -> None:
    r"""Make ``tqdm`` bars in worker cells report progress instead of writing ``\\r`` text."""
    try:  # tqdm is optional: only cells that use it need it
        import tqdm  # noqa: PLC0415
        import tqdm.auto  # noqa: PLC0415
        import tqdm.std  # noqa: PLC0415
    except ImportError:
        return
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker

    class ProgressTqdm(tqdm.std.tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = devnull
            super().__init__(*args, **kwargs)

        def display(self, msg: Any = None, pos: Any = None) -> bool:
            # Nested bars (an inner loop's): the outermost one open is the task's progress,
            # the inner ones are said beside it, as a kernel shows them on lines below it.
            # A closing bar is no longer among the open ones.
            bars = [b for b in list(self._instances) if isinstance(b, ProgressTqdm)]
            bars.sort(key=lambda bar: abs(getattr(bar, "pos", 0)))
            outer = bars[0] if bars else self
            notes = [str(outer.desc or ""), *(_inner_bar(bar) for bar in bars[1:])]
            progress(outer.n, outer.total, " · ".join(note for note in notes if note))
            return True

    def trange(*args: Any, **kwargs: Any) -> Any:
        return ProgressTqdm(range(*args), **kwargs)

    class NotebookTqdm(ProgressTqdm):  # tqdm.notebook's, whose widget no kernel would show
        pass

    def tnrange(*args: Any, **kwargs: Any) -> Any:
        return NotebookTqdm(range(*args), **kwargs)

    # Named as what they stand for, so a cell that imports them gives the notebook its
    # own tqdm.tqdm and tqdm.trange (pickled by reference), as the import would there.
    for stand_in, where, name in (
        (ProgressTqdm, "tqdm.std", "tqdm"),
        (trange, "tqdm.std", "trange"),
        (NotebookTqdm, "tqdm.notebook", "tqdm"),
        (tnrange, "tqdm.notebook", "trange"),
    ):
        stand_in.__module__, stand_in.__qualname__ = where, name

    modules: list[Any] = [tqdm, tqdm.std, tqdm.auto, sys.modules.get("tqdm.autonotebook")]
    for module in modules:
        if module is not None:
            module.tqdm = ProgressTqdm
            module.trange = trange

    def notebook_bars(module: Any) -> None:
        module.tqdm = module.tqdm_notebook = NotebookTqdm
        module.trange = module.tnrange = tnrange

    patched_on_import("tqdm.notebook", notebook_bars)


def patched_on_import(name: str, patch: Callable[[Any], None]) -> None:
    """Call ``patch`` on module ``name`` once it is imported (at once if it is already).

    For modules too costly to import into every worker process ahead of a cell that may
    use them (``tqdm.notebook`` imports ipywidgets): a cell's import, or the unpickling of
    a notebook value that names it, imports it patched.
    """
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
        return
    sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds one module as the other finders do, and patches it once it has run."""

    def __init__(self, name: str, patch: Callable[[Any], None]) -> None:
        self._name, self._patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self._name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self._patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)


def _inner_bar(bar: Any) -> str:
    """``desc 42/100``: where an inner ``tqdm`` bar is."""
    done = f"{bar.n}/{bar.total}" if bar.total else f"{bar.n}"
    return f"{bar.desc} {done}" if bar.desc else done
