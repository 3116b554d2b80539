"""``nbtask run NOTEBOOK``: execute a notebook headless and stream it to the terminal.

The notebook runs top to bottom in a fresh kernel (the Python running nbtask) with
:mod:`nbclient`, against the embedded cluster or a broker. Each code cell gets a progress
line, and its text output is written to the terminal as the kernel produces it. After the
last cell, the background ``%%task`` cells still running are waited for, as a notebook run
to its end would be (:mod:`.run_end`): their final output is in their cells, and one that
failed fails the run. The executed notebook is written out, even when a cell fails.

``%%task`` cells show their text view here (``NBTASK_WIDGETS=0`` in the kernel): a widget
has no one to draw it in a headless run, and text reads well both in the terminal and in
the executed notebook.

nbclient and nbformat are imported only when this module is, so ``import nbtask`` stays
light.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, TextIO

import nbformat as _nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from nbtask._text import redact_url
from nbtask.errors import ConfigurationError, NotebookFailed
from nbtask.wire.events import FINAL_STATES

__all__ = ["RunResult", "default_output", "run_notebook"]

nbformat: Any = _nbformat  # partly annotated: read/write are untyped

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The text view's first line: "[label] STATE ..." (see nbtask.widgets.TextView).
_STATUS = re.compile(r"^\[(?P<label>[^\]]*)\] (?P<state>[A-Z_]+)\b")
_STATUS_INTERVAL = 1.0
#: Run in the kernel after the last cell: the background cells still running are waited
#: for (nbtask.notebook.run_end), if nbtask was loaded. ``{timeout}``: seconds, or None;
#: ``{may_fail}``: the numbers (In[N]) of the cells tagged ``raises-exception``.
_FINISH = (
    "import sys as _nbtask_sys\n"
    "if 'nbtask.notebook.magics' in _nbtask_sys.modules:\n"
    "    __import__('nbtask.notebook.run_end', fromlist=['_']).finish_background(\n"
    "        get_ipython(), {timeout}, may_fail={may_fail})\n"
    "del _nbtask_sys"
)
#: How much longer than the kernel's own wait the runner waits for it to say so.
_FINISH_MARGIN = 30.0
_CELL_NUMBER = re.compile(r"\bcell In\[(\d+)\]")
_FINAL_STATES = frozenset(state.value for state in FINAL_STATES)
#: The tag of a cell that may raise (nbclient's), whether it waits or runs in the background.
_ALLOWED_ERRORS = "raises-exception"


@dataclasses.dataclass
class RunResult:
    """The outcome of :func:`run_notebook`."""

    notebook: Any
    output: Path | None
    cells_run: int
    seconds: float


def default_output(path: Path) -> Path:
    """``quickstart.ipynb`` -> ``quickstart.out.ipynb``, next to it."""
    return path.with_name(f"{path.stem}.out.ipynb")


class _NativeKernels(KernelSpecManager):
    """``python3`` is always the Python running nbtask, whatever kernelspecs are installed.

    So the kernel can import the nbtask this command belongs to (a ``python3`` spec in a
    Jupyter data dir may point at another interpreter).
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == "python3":
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (ipykernel)",
                language="python",
                metadata={"debugger": True},
            )
        return super().get_kernel_spec(kernel_name)


class _StreamingClient(NotebookClient):
    """A NotebookClient that also writes each output to a terminal as it arrives."""

    def __init__(self, nb: Any, out: TextIO, **kwargs: Any) -> None:
        super().__init__(nb, **kwargs)
        self.out = out
        self.color = bool(getattr(out, "isatty", lambda: False)())
        self.code_total = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
        self.code_seen = 0
        self.started_at = time.monotonic()
        self._displays: dict[str, tuple[str, str, float]] = {}  # id -> (status, body, time)
        self._line_start = True
        #: The task view whose output the open line ends with, if one does: its output goes
        #: on on that line, as the task printed it (``print(i, end="")``).
        self._open: str | None = None
        # A task view updated while a printed line is still open: shown once the line ends
        # (a print's pieces may come in several stream messages), never in the middle of it.
        self._held: dict[str, str] = {}  # display id -> its latest text
        self.on_cell_execute = self._announce
        #: Set while the background cells are waited for, after the last cell.
        self.finishing = False
        #: The notebook's position (0-based) of each cell by its number in the kernel (In[N]).
        self.numbers: dict[int, int] = {}

    def create_kernel_manager(self) -> Any:
        name = self.kernel_name or self.nb.metadata.get("kernelspec", {}).get("name") or "python3"
        self.kernel_name = name
        # IPC sockets (no "running over TCP without encryption" warning), at an absolute
        # path: the kernel runs in the notebook's directory, not ours.
        sockets = Path(jupyter_runtime_dir()) / f"nbtask-run-{uuid.uuid4().hex[:12]}"
        sockets.parent.mkdir(parents=True, exist_ok=True)
        self.km = AsyncKernelManager(
            kernel_name=name,
            transport="ipc",
            ip=str(sockets),
            kernel_spec_manager=_NativeKernels(),
        )
        return self.km

    async def async_execute_cell(
        self,
        cell: Any,
        cell_index: int,
        execution_count: int | None = None,
        store_history: bool = True,
    ) -> Any:
        """Execute a cell; after the last, wait for the background cells still running."""
        done = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        if cell_index == len(self.nb.cells) - 1 and not self.finishing:
            await self._finish_background()
        return done

    async def _finish_background(self) -> None:
        """Run :data:`_FINISH` as a cell of its own, kept out of the executed notebook.

        The background cells' views are updated in their own cells meanwhile; what it says
        itself is only streamed to the terminal.
        """
        limit = "None" if self.timeout is None else repr(float(self.timeout))
        # A background cell tagged to raise may fail, as a cell that waits may.
        tagged = [
            number
            for number, index in self.numbers.items()
            if _ALLOWED_ERRORS in self.nb.cells[index].metadata.get("tags", [])
        ]
        step = nbformat.v4.new_code_cell(
            _FINISH.format(timeout=limit, may_fail=repr(tuple(sorted(tagged))))
        )
        self.nb.cells.append(step)
        self.finishing = True
        try:
            await super().async_execute_cell(step, len(self.nb.cells) - 1, store_history=False)
        finally:
            self.nb.cells.remove(step)

    def _get_timeout(self, cell: Any) -> int | None:
        timeout = super()._get_timeout(cell)
        if self.finishing and timeout is not None:  # the kernel says when its wait ends
            return int(timeout + _FINISH_MARGIN)
        return timeout

    # Terminal ------------------------------------------------------------------------------
    def _write(self, text: str, *, raw: bool = False) -> None:
        """Write a line (ended with a newline), or ``raw`` text as it comes (a stream)."""
        if not text:
            return
        if not self.color:
            text = _ANSI.sub("", text)
        if not raw:
            if not self._line_start:
                text = "\n" + text
            if not text.endswith("\n"):
                text += "\n"
        self.out.write(text)
        self.out.flush()
        self._line_start = text.endswith("\n")
        self._open = None

    def _announce(self, cell: Any, cell_index: int, **_kw: Any) -> None:
        self.release_held()
        if self.finishing:  # not a cell of the notebook
            return
        self.numbers[self.code_cells_executed + 1] = cell_index  # its In[N], as the kernel counts
        self.code_seen += 1
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        elapsed = time.monotonic() - self.started_at
        self._write(
            f"── [{self.code_seen}/{self.code_total}] cell {cell_index + 1} "
            f"(at {elapsed:.1f} s): {first[:70]}"
        )

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        try:
            self._echo(msg)
        except Exception as exc:  # the terminal copy must never break the run
            self.log.debug("could not echo %s: %s", msg.get("msg_type"), exc)
        return super().process_message(msg, cell, cell_index)

    def _echo(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "stream":
            if self._open is not None:  # a line a task view left open: not continued here
                self._write("\n", raw=True)
            self._write(str(content.get("text", "")), raw=True)
            if self._line_start:
                self.release_held()
            return
        display_id = (content.get("transient") or {}).get("display_id")
        data = content.get("data", {})
        in_place = display_id and kind == "update_display_data" and data.keys() == {"text/plain"}
        if in_place and not self._line_start and self._open is None:  # a printed line
            self._held[str(display_id)] = str(data["text/plain"])
            return
        self.release_held()
        if kind == "error":
            self._write("\n".join(content.get("traceback", [])))
        elif kind in ("execute_result", "display_data", "update_display_data"):
            text = data.get("text/plain")
            if text is not None and display_id and data.keys() == {"text/plain"}:
                self._echo_display(str(display_id), str(text), kind != "update_display_data")
            elif text is not None:
                self._write(str(text))
            elif data:
                self._write(f"[{', '.join(sorted(data))}]")

    def release_held(self) -> None:
        """Show the task views held back while a printed line was open."""
        held, self._held = self._held, {}
        for display_id, text in held.items():
            self._echo_display(display_id, text, new=False)

    def _echo_display(self, display_id: str, text: str, new: bool) -> None:
        """A display updated in place (a task's text view): print only what changed.

        Its first line is the task's status: printed when the state changes, at most once a
        second otherwise, and never in the middle of a line the task printed (until the
        task ends). The rest is output that only grows: printed as it grows, as the task
        printed it (a line printed in pieces stays one line).
        """
        status, _, body = text.partition("\n")
        old_status, old_body, last = self._displays.get(display_id, ("", "", 0.0))
        now = time.monotonic()
        going_on = self._open == display_id  # the open line is the end of its output
        if new or not body.startswith(old_body):
            old_body, going_on = "", False  # replaced, not appended to: show it whole
        added = body[len(old_body) :]
        old_state = _STATUS.match(old_status)
        state = _STATUS.match(status)
        changed = (state and state["state"]) != (old_state and old_state["state"])
        due = status != old_status and (changed or now - last >= _STATUS_INTERVAL)
        ended = state is not None and state["state"] in _FINAL_STATES
        if going_on and added.startswith("\n"):  # the line the view left open has ended
            self._write("\n", raw=True)
            added = added[1:]
        elif not going_on:
            added = added.lstrip("\n")
        if due and self._line_start and added and not ended:  # before the output after it
            self._write(status)
            old_status, last, due = status, now, False
        if added:
            if not self._line_start and not going_on:
                self._write("\n", raw=True)
            self._write(added, raw=True)
            # The view leaves its last line open: what ends it comes with the next update.
            self._open = display_id if not self._line_start else None
        if due and (self._line_start or ended):
            self._write(status)
            old_status, last = status, now
        self._displays[display_id] = (old_status, body, last)


def run_notebook(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    broker: str | None = None,
    timeout: float | None = 600.0,
    kernel_name: str | None = None,
    env: dict[str, str] | None = None,
    out: TextIO | None = None,
    write: bool = True,
) -> RunResult:
    """Execute the notebook at ``path`` top to bottom, streaming its text output.

    Parameters
    ----------
    path
        The notebook to run; its directory is the kernel's working directory.
    output
        Where to write the executed notebook (default: :func:`default_output`).
    broker
        Broker URL for the kernel's ``NBTASK_BROKER`` (default: the environment's, else
        the embedded cluster). Its secret comes from ``NBTASK_SECRET`` as usual.
    timeout
        Seconds one cell may run, and the background ``%%task`` cells still running after
        the last cell (``None``: no limit).
    kernel_name
        Kernel to use (default: the notebook's, ``python3`` meaning this Python).
    env
        Extra environment variables for the kernel.
    out
        Where the progress lines and outputs go (default: ``sys.stdout``).
    write
        Write the executed notebook (also when a cell fails).

    Raises
    ------
    ConfigurationError
        The notebook cannot be read, or the kernel does not exist.
    NotebookFailed
        A cell raised an error (unless tagged ``raises-exception``), timed out, or the
        kernel died; or a background cell failed (unless tagged so too), or still ran
        ``timeout`` seconds after the last cell (it was cancelled). The executed notebook
        has been written.
    """
    source = Path(path)
    try:
        nb = nbformat.read(source, as_version=4)
    except FileNotFoundError:
        raise ConfigurationError(f"no notebook at {source}") from None
    except Exception as exc:
        raise ConfigurationError(f"{source} is not a readable notebook: {exc}") from None
    target = Path(output) if output is not None else default_output(source)
    stream = out if out is not None else sys.stdout

    kernel_env = dict(os.environ)
    kernel_env["NBTASK_WIDGETS"] = "0"
    if broker:
        kernel_env["NBTASK_BROKER"] = broker
    kernel_env.update(env or {})

    client = _StreamingClient(
        nb,
        stream,
        timeout=timeout,
        kernel_name=kernel_name or "",
        resources={"metadata": {"path": str(source.resolve().parent)}},
        record_timing=False,
    )
    code_cells = client.code_total
    where = broker or kernel_env.get("NBTASK_BROKER") or "the embedded cluster"
    plural = "s" if code_cells != 1 else ""
    client._write(f"nbtask run: {source} ({code_cells} code cell{plural}) on {redact_url(where)}")
    started = time.monotonic()
    failure: str | None = None
    # The kernel process's own stderr (its log, not the cells' output, which arrives as
    # messages) is kept out of the terminal; its last line explains a kernel that died.
    with tempfile.TemporaryFile() as kernel_log:
        try:
            client.execute(env=kernel_env, stderr=kernel_log)
        except CellExecutionError as exc:
            failure = _describe_error(nb, client, exc)
        except CellTimeoutError:
            failure = (
                f"cell {_current_cell(nb, client)} did not finish within {timeout:g} s "
                "(raise --timeout)"
            )
            if client.finishing:
                failure = (
                    f"the background cells did not finish within {timeout:g} s (raise --timeout)"
                )
        except DeadKernelError:
            running = (
                "waiting for the background cells"
                if client.finishing
                else (f"running cell {_current_cell(nb, client)}")
            )
            failure = f"the kernel died while {running}{_last_words(kernel_log)}"
        except NoSuchKernel as exc:
            raise ConfigurationError(f"no kernel named {exc.args[0]!r}") from None
        except RuntimeError as exc:  # nbclient: "Kernel didn't respond in 60 seconds"
            failure = f"the kernel did not start: {exc}{_last_words(kernel_log)}"
    seconds = time.monotonic() - started
    result = RunResult(nb, target if write else None, client.code_seen, seconds)
    if write:
        nbformat.write(nb, target)
    if failure is not None:
        written = f"; the executed notebook is in {target}" if write else ""
        raise NotebookFailed(failure + written, result)
    client.release_held()
    client._write(
        f"nbtask run: {client.code_seen} cells ran in {seconds:.1f} s"
        + (f"; wrote {target}" if write else "")
    )
    return result


def _last_words(log: IO[bytes]) -> str:
    """`` (kernel: <its last stderr line>)``, or nothing."""
    log.seek(0)
    lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
    return f" (kernel: {lines[-1][:200]})" if lines else ""


def _current_cell(nb: Any, client: _StreamingClient) -> str:
    """``3`` (1-based), the cell the client was running when it stopped."""
    seen = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.source.strip():
            seen += 1
            if seen == client.code_seen:
                return str(index + 1)
    return "?"


def _describe_error(nb: Any, client: _StreamingClient, exc: CellExecutionError) -> str:
    ename = getattr(exc, "ename", "") or "error"
    evalue = str(getattr(exc, "evalue", "") or "").strip().splitlines()
    if client.finishing:  # said by run_end.py, naming cells by their In[N]
        said = evalue[0] if evalue else ename
        return "in the background, " + _CELL_NUMBER.sub(lambda m: _cell_at(client, m), said)
    detail = f"{ename}: {evalue[0]}" if evalue else ename
    return f"cell {_current_cell(nb, client)} failed with {detail}"


def _cell_at(client: _StreamingClient, number: re.Match[str]) -> str:
    """``cell 3``, the notebook's position of the cell the kernel numbered ``In[N]``."""
    index = client.numbers.get(int(number[1]))
    return number[0] if index is None else f"cell {index + 1}"
