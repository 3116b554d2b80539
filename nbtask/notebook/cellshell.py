"""Notebook cells, worker side: run a cell in an IPython shell, send back what changed.

:func:`execute_cell` runs a :class:`~nbtask.notebook.shipping.CellSpec` in an IPython
shell made once per worker process, in a fresh namespace holding only what was shipped,
and returns the names
the cell assigned plus shipped values it changed in place (found by a digest of their
pickled state). Displays, the last expression and ``tqdm`` bars become task events.

"""

from __future__ import annotations

import ast
import base64
import hashlib
import os
import sys
import types
from typing import Any

from IPython.core.compilerop import CachingCompiler
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from nbtask.core.context import current_request, progress
from nbtask.notebook.shipping import CellSpec
from nbtask.wire.envelope import Envelope, dumps

__all__ = ["execute_cell"]


_SHELL: Any = None  # the worker's one IPython shell, made on first use in this process
_BASE_NS: dict[str, Any] = {}


def execute_cell(spec: CellSpec, blob: bytes) -> Any:
    """Run a cell in this process's worker shell, in a fresh namespace.

    Returns
    -------
    dict
        ``{"values": pickled {name: value}, "names": [...], "skipped": {name: why},
        "deleted": [...]}``; with ``spec.plain`` just ``{name: value}``.

    Raises
    ------
    BaseException
        The cell's own exception, its traceback starting at the cell's first line.
    """
    shell = _worker_shell()
    for attempt in range(spec.retries + 1):
        shipped: dict[str, Any] = Envelope({}, blob).load_body() if blob else {}
        before = {n: _digest(v) for n, v in shipped.items() if _may_change(v)}
        namespace = shell.user_ns
        namespace.clear()
        namespace.update(_BASE_NS)
        namespace.update(shipped)
        shell.compile.cell_filename = spec.filename
        shell.compile.line_offset = spec.line_offset
        shell.displayhook.cell_source = spec.source
        result = shell.run_cell(spec.source, store_history=False)
        error = result.error_before_exec or result.error_in_exec
        if error is None:
            break
        if attempt < spec.retries and isinstance(error, Exception):
            print(
                f"retrying the cell ({attempt + 1}/{spec.retries}) after "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )
            continue
        raise _from_cell(error, spec.filename)
    out: dict[str, Any] = {}
    for name, value in namespace.items():
        if name in _BASE_NS and _BASE_NS[name] is value:
            continue
        # Read, not rebound: send it back only if its pickled state changed.
        unchanged = name not in before or _digest(value) == before[name]
        if name in shipped and value is shipped[name] and name not in spec.assigned and unchanged:
            continue
        if name.startswith("_") and name in _IPYTHON_NAMES:
            continue
        out[name] = value
    deleted = [n for n in shipped if n not in namespace]
    return _pack(out, deleted, spec.plain)


_IPYTHON_NAMES = frozenset({"_", "__", "___", "_exit_code", "_i", "_ii", "_iii"})


def _pack(out: dict[str, Any], deleted: list[str], plain: bool) -> Any:
    skipped: dict[str, str] = {}
    try:
        blob = dumps(out)
    except Exception:
        for name, value in list(out.items()):
            try:
                dumps(value)
            except Exception as exc:
                skipped[name] = f"{type(value).__name__} cannot be pickled: {exc}"
                del out[name]
        blob = dumps(out)
    if plain:
        return out
    return {"values": blob, "names": sorted(out), "skipped": skipped, "deleted": deleted}


def _may_change(value: Any) -> bool:
    return not isinstance(
        value,
        (
            types.ModuleType,
            types.FunctionType,
            type,
            int,
            float,
            str,
            bytes,
            bool,
            type(None),
            frozenset,
        ),
    )


def _digest(value: Any) -> bytes:
    try:
        return hashlib.blake2b(dumps(value), digest_size=16).digest()
    except Exception:
        return b""


def _from_cell(error: BaseException, filename: str) -> BaseException:
    """The cell's exception, its traceback trimmed to start in the cell's code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return error.with_traceback(tb)


def _worker_shell() -> Any:
    global _SHELL  # noqa: PLW0603 - one shell per worker process, made lazily
    if _SHELL is None:
        _SHELL = _make_shell()
        _BASE_NS.update(_SHELL.user_ns)
    return _SHELL


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
            _emit_display({"data": {}, "metadata": {}, "clear": True})

    class Hook(DisplayHook):  # type: ignore[misc]
        cell_source = ""

        def quiet(self) -> bool:
            return bool(self.semicolon_at_end_of_expression(self.cell_source))

        def start_displayhook(self) -> None:
            pass

        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: Any, md_dict: Any = None) -> None:
            metadata = {**_jsonable(md_dict or {}), "nbtask": {"execute_result": True}}
            _emit_display({"data": _jsonable(format_dict), "metadata": metadata})

        def finish_displayhook(self) -> None:
            pass

    class Compiler(CachingCompiler):  # type: ignore[misc]
        cell_filename = "<cell>"

        line_offset = 0

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return self.cell_filename

        # Shift line numbers (and the cached source) so tracebacks match the notebook's cell.
        def cache(self, transformed_code: str, number: int = 0, raw_code: Any = None) -> str:
            padded = "\n" * self.line_offset + transformed_code
            return str(super().cache(padded, number, raw_code))

        def ast_parse(self, source: str, filename: str = "<unknown>", symbol: str = "exec") -> Any:
            tree = super().ast_parse(source, filename, symbol)
            return ast.increment_lineno(tree, self.line_offset)

    class WorkerShell(InteractiveShell):  # type: ignore[misc]
        displayhook_class = Hook
        display_pub_class = Publisher

        def showtraceback(self, *args: Any, **kwargs: Any) -> None:
            pass  # the exception is re-raised to the client instead

        def showsyntaxerror(self, *args: Any, **kwargs: Any) -> None:
            pass

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.cache_size = 0
    config.InteractiveShell.colors = "NoColor"
    config.InteractiveShell.ast_node_interactivity = "last_expr"
    shell = WorkerShell.instance(config=config)
    shell.compile = Compiler()
    _install_tqdm()
    return shell


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
            progress(self.n, self.total, str(self.desc or ""))
            return True

    def trange(*args: Any, **kwargs: Any) -> Any:
        return ProgressTqdm(range(*args), **kwargs)

    modules: list[Any] = [tqdm, tqdm.std, tqdm.auto, sys.modules.get("tqdm.autonotebook")]
    for module in modules:
        if module is not None:
            module.tqdm = ProgressTqdm
            module.trange = trange
