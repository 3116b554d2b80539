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

import asyncio
import dataclasses
import os
import re
import signal
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
from nbtask.errors import ConfigurationError, NotebookFailed, NotebookInterrupted
from nbtask.notebook.run_terminal import Terminal

__all__ = ["RunResult", "default_output", "run_notebook"]

nbformat: Any = _nbformat  # partly annotated: read/write are untyped

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
#: The tag of a cell that may raise (nbclient's), whether it waits or runs in the background.
_ALLOWED_ERRORS = "raises-exception"
#: The signals that stop a run: the kernel is interrupted, as Stop in a frontend would.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds between the interrupts sent to the kernel until it is seen running a cell: one
#: that came as a cell was being sent, before it ran, found the kernel idle, which ignores it.
_INTERRUPT_AGAIN = 1.0


class _Interrupted(Exception):
    """Raised out of nbclient's loop: a stop signal came, and no cell is to run any more."""


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
        self.terminal = Terminal(out)
        self.code_total = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
        self.code_seen = 0
        self.started_at = time.monotonic()
        self.on_cell_execute = self._announce
        #: Set while the background cells are waited for, after the last cell.
        self.finishing = False
        #: The notebook's position (0-based) of each cell by its number in the kernel (In[N]).
        self.numbers: dict[int, int] = {}
        #: The first stop signal that came (SIGINT, SIGTERM), and how many did.
        self.interrupted: signal.Signals | None = None
        self.signals = 0
        #: Set once a second stop signal shut the kernel down under the running cell.
        self.killed = False
        #: Whether the kernel said it runs the cell sent last (its status: busy, then idle).
        self.kernel_busy = False
        self._cleaning = False
        self._signalled: set[asyncio.Future[None]] = set()  # kept until done

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

    async def async_start_new_kernel(self, **kwargs: Any) -> None:
        self._catch_signals()  # in place of nbclient's, set just before
        await super().async_start_new_kernel(**kwargs)

    async def _async_cleanup_kernel(self) -> None:
        self._cleaning = True  # the kernel is being shut down: a signal has nothing to stop
        await super()._async_cleanup_kernel()

    async def async_execute_cell(
        self,
        cell: Any,
        cell_index: int,
        execution_count: int | None = None,
        store_history: bool = True,
    ) -> Any:
        """Execute a cell; after the last, wait for the background cells still running."""
        if self.interrupted is not None:
            raise _Interrupted
        done = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        if self.interrupted is not None:  # the cell ended, interrupted, without an error
            raise _Interrupted
        if cell_index == len(self.nb.cells) - 1 and not self.finishing:
            await self._finish_background()
        return done

    def _catch_signals(self) -> None:
        """Handle SIGINT and SIGTERM in the run's event loop (:meth:`_on_signal`).

        nbclient's handlers shut the kernel down under the running cell, which then fails
        with nbclient's own errors. Without an event loop in the main thread, none is set.
        """
        loop = asyncio.get_running_loop()
        for signum in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (RuntimeError, ValueError, NotImplementedError):
                return

    def _on_signal(self, signum: int) -> None:
        """The first stop signal interrupts the kernel; another shuts it down at once.

        Interrupted, a cell waiting for its task cancels it, and the wait for the
        background cells cancels them (:mod:`.run_end`); the cell ends with an error, and
        no cell runs after it. One that comes while the kernel shuts down changes nothing.
        """
        if self._cleaning:
            return
        self.signals += 1
        if self.interrupted is None:
            self.interrupted = signal.Signals(signum)
        if self.km is None or self.kc is None:
            return  # the kernel is still starting: no cell will run
        if self.signals == 1:
            self._interrupt()
        elif not self.killed:
            self.killed = True
            self._signal_kernel(self.km.shutdown_kernel(now=True))

    def _interrupt(self) -> None:
        """Interrupt the kernel, and again every second while it was not seen running a cell.

        One interrupt, as one Stop in a frontend: a cell waiting for its task interrupts
        the task and follows it to its end (a second would kill it), and the wait for the
        background cells cancels them. Sent again only while the kernel may have been idle
        (the cell not run yet), which ignores it.
        """
        if self._cleaning or self.killed or self.km is None:
            return
        self._signal_kernel(self.km.interrupt_kernel())
        if not self.kernel_busy:
            asyncio.get_running_loop().call_later(_INTERRUPT_AGAIN, self._interrupt)

    def _signal_kernel(self, step: Any) -> None:
        """Run ``step`` (the kernel's interrupt, or shutdown) in the background."""
        future = asyncio.ensure_future(_quietly(step))
        self._signalled.add(future)
        future.add_done_callback(self._signalled.discard)

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

    def _announce(self, cell: Any, cell_index: int, **_kw: Any) -> None:
        self.terminal.release_held()
        if self.finishing:  # not a cell of the notebook
            return
        self.numbers[self.code_cells_executed + 1] = cell_index  # its In[N], as the kernel counts
        self.code_seen += 1
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        elapsed = time.monotonic() - self.started_at
        self.terminal.write(
            f"── [{self.code_seen}/{self.code_total}] cell {cell_index + 1} "
            f"(at {elapsed:.1f} s): {first[:70]}"
        )

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        if msg.get("msg_type") == "status":
            self.kernel_busy = msg.get("content", {}).get("execution_state") == "busy"
        try:
            self.terminal.echo(msg)
        except Exception as exc:  # the terminal copy must never break the run
            self.log.debug("could not echo %s: %s", msg.get("msg_type"), exc)
        return super().process_message(msg, cell, cell_index)


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
    client.terminal.write(
        f"nbtask run: {source} ({code_cells} code cell{plural}) on {redact_url(where)}"
    )
    started = time.monotonic()
    # The kernel process's own stderr (its log, not the cells' output, which arrives as
    # messages) is kept out of the terminal; its last line explains a kernel that died.
    with tempfile.TemporaryFile() as kernel_log:
        failure = _execute(client, kernel_env, kernel_log)
    seconds = time.monotonic() - started
    result = RunResult(nb, target if write else None, client.code_seen, seconds)
    if write:
        nbformat.write(nb, target)
    if client.interrupted is not None:
        written = f"; the notebook as far as it ran is in {target}" if write else ""
        raise NotebookInterrupted(
            _describe_interrupt(nb, client, failure) + written, result, client.interrupted
        )
    if failure is not None:
        written = f"; the executed notebook is in {target}" if write else ""
        raise NotebookFailed(failure + written, result)
    client.terminal.release_held()
    client.terminal.write(
        f"nbtask run: {client.code_seen} cells ran in {seconds:.1f} s"
        + (f"; wrote {target}" if write else "")
    )
    return result


def _execute(client: _StreamingClient, env: dict[str, str], kernel_log: IO[bytes]) -> str | None:
    """Run the notebook's cells: what went wrong, if anything.

    After a stop signal, the interrupted cell's own word on it, if it said one.
    """
    try:
        client.execute(env=env, stderr=kernel_log)
    except NoSuchKernel as exc:
        raise ConfigurationError(f"no kernel named {exc.args[0]!r}") from None
    except (_Interrupted, CellExecutionError, CellTimeoutError, RuntimeError) as exc:
        return _describe_stop(client, exc, kernel_log)
    return None


def _describe_stop(client: _StreamingClient, exc: Exception, kernel_log: IO[bytes]) -> str | None:
    """What stopped the run early, in one line (``None``: a stop signal, said alone)."""
    nb, timeout = client.nb, client.timeout
    where = "waiting for the background cells" if client.finishing else None
    if isinstance(exc, _Interrupted):
        said = None
    elif isinstance(exc, CellExecutionError):
        interrupted = client.interrupted is not None
        said = (
            (_first_line(client, exc) or None) if interrupted else _describe_error(nb, client, exc)
        )
    elif isinstance(exc, CellTimeoutError):
        what = "the background cells" if where else f"cell {_current_cell(nb, client)}"
        said = f"{what} did not finish within {timeout:g} s (raise --timeout)"
    elif isinstance(exc, DeadKernelError):
        running = where or f"running cell {_current_cell(nb, client)}"
        said = f"the kernel died while {running}{_last_words(kernel_log)}"
    else:  # nbclient: "Kernel didn't respond in 60 seconds"
        said = f"the kernel did not start: {exc}{_last_words(kernel_log)}"
    return said


async def _quietly(step: Any) -> None:
    """Await ``step`` (the kernel's interrupt, or its shutdown) whatever it raises.

    The kernel may have ended meanwhile: the run's own end says what happened.
    """
    try:
        await step
    except Exception:  # the run goes on to its end regardless, and says how it ended
        return


def _describe_interrupt(nb: Any, client: _StreamingClient, said: str | None) -> str:
    """``interrupted (SIGINT) in cell 2: task 'x' cancelled``: what a stop signal stopped."""
    assert client.interrupted is not None
    if client.finishing:
        where = "while waiting for the background cells"
    elif client.code_seen:
        where = f"in cell {_current_cell(nb, client)}"
    else:
        where = "before the first cell"
    if client.killed:  # the cell could not say how it ended
        said, stopped = None, " (signalled again: the kernel was stopped at once)"
    else:
        stopped = ""
    return (
        f"interrupted ({client.interrupted.name}) {where}" + (f": {said}" if said else "") + stopped
    )


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
    said = _first_line(client, exc)
    if client.finishing:  # said by run_end.py
        return "in the background, " + (said or ename)
    detail = f"{ename}: {said}" if said else ename
    return f"cell {_current_cell(nb, client)} failed with {detail}"


def _first_line(client: _StreamingClient, exc: CellExecutionError) -> str:
    """The first line of a cell's error message, naming cells by their notebook position.

    (run_end.py names them by their number in the kernel, ``cell In[3]``.)
    """
    lines = str(getattr(exc, "evalue", "") or "").strip().splitlines()
    said = lines[0] if lines else ""
    return _CELL_NUMBER.sub(lambda m: _cell_at(client, m), said) if client.finishing else said


def _cell_at(client: _StreamingClient, number: re.Match[str]) -> str:
    """``cell 3``, the notebook's position of the cell the kernel numbered ``In[N]``."""
    index = client.numbers.get(int(number[1]))
    return number[0] if index is None else f"cell {index + 1}"
