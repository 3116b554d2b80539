"""``nbtask run NOTEBOOK``: headless execution, streamed to the terminal, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import ROOT
from nbformat.v4 import new_code_cell, new_notebook

from nbtask import Settings

pytestmark = pytest.mark.timeout(180)


def nbtask_run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Any:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    return subprocess.run(
        [sys.executable, "-m", "nbtask", "run", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )


def write_notebook(path: Path, *sources: str, tags: dict[int, list[str]] | None = None) -> Path:
    nb = new_notebook(
        cells=[new_code_cell(s) for s in sources],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    for index, cell_tags in (tags or {}).items():
        nb.cells[index].metadata["tags"] = cell_tags
    nbformat.write(nb, path)
    return path


def test_quickstart_runs_and_streams(tmp_path: Path) -> None:
    out = tmp_path / "quickstart-run.ipynb"
    result = nbtask_run("notebooks/quickstart.ipynb", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    stdout = result.stdout
    # a progress line per code cell, in order
    assert (
        "nbtask run: notebooks/quickstart.ipynb (11 code cells) on the embedded cluster" in stdout
    )
    lines = [ln for ln in stdout.splitlines() if ln.startswith("── [")]
    assert [ln.split("]")[0] for ln in lines] == [f"── [{i}/11" for i in range(1, 12)], lines
    # when each cell began, counted from the start of the run (not how long it took)
    assert all(re.search(r"\] cell \d+ \(at \d+\.\d s\): ", ln) for ln in lines), lines
    # the cells' text output, as it was produced
    for expected in [
        "nbtask: embedded cluster",
        "chunk 0 done",
        "chunk 15 done",
        "[crunch] SUCCESS 20/20 crunching",
        "total = 22499775000500000",
        "6656670000",  # the named cell sent again with size=1_000
        "<Figure size 600x250 with 1 Axes>",
        "ZeroDivisionError: division by zero",
        "long_task is REVOKED",
        "nbtask run: 11 cells ran in",
        f"wrote {out}",
    ]:
        assert expected in stdout, f"{expected!r} not in:\n{stdout}"
    assert stdout.index("chunk 0 done") < stdout.index("total = ")
    assert "\x1b[" not in stdout, "no colour codes when the terminal is a pipe"

    nb = nbformat.read(out, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    plot = next(c for c in code if "matplotlib" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    # headless: the text view, not a widget nobody can see
    crunch = next(c for c in code if c.source.startswith("%%task crunch"))
    assert "application/vnd.jupyter.widget-view+json" not in json.dumps(crunch.outputs)


def test_failing_cell_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "broken.ipynb",
        "print('before')",
        "raise KeyError('expected')",  # tagged: the run goes on
        "def f():\n    return 1 / 0\nf()",
        "print('after')",
        tags={1: ["raises-exception"]},
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "nbtask run: error: cell 3 failed with ZeroDivisionError: division by zero; "
        f"the executed notebook is in {tmp_path / 'broken.out.ipynb'}"
    ], result.stderr
    assert "before" in result.stdout and "KeyError" in result.stdout
    assert "return 1 / 0" in result.stdout  # the traceback was streamed
    assert "after" not in result.stdout
    written = nbformat.read(tmp_path / "broken.out.ipynb", as_version=4)
    assert written.cells[2].outputs[0].output_type == "error"
    assert written.cells[3].execution_count is None


def test_a_task_view_updated_while_a_line_is_printed_never_cuts_it(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "pieces.ipynb",
        "%load_ext nbtask",
        "%%task --out h\nimport time\ntime.sleep(0.5)\nprint('made')",
        # The line's first piece goes out alone; the task ends (its view changes) before
        # the rest of the line is printed.
        "import sys, time\nsys.stdout.write('the line'); sys.stdout.flush()\n"
        "h.result(60); time.sleep(0.5)\nprint(' is whole')",
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the line is whole\n" in result.stdout, result.stdout
    assert "made" in result.stdout and "SUCCESS" in result.stdout  # the view, shown after


def test_a_line_a_background_cell_prints_in_pieces_stays_one_line(tmp_path: Path) -> None:
    """``print(i, end="")``, then ``\\r``: the terminal shows what it shows for the local cell."""
    pieces = (
        "import time\nfor i in range(5):\n    print(i, end='', flush=True)\n"
        "    time.sleep(0.4)\nprint('\\rdone')"
    )
    notebook = write_notebook(
        tmp_path / "pieces.ipynb", "%load_ext nbtask", pieces, f"%%task\n{pieces}"
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Read as text, the "\\r" is a line end.
    local, _, task = result.stdout.partition("%%task")
    assert "01234\ndone\n" in local, local
    assert "01234\ndone\n" in task, task  # not a line per piece, nor a status line inside
    assert "SUCCESS" in task


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    missing = nbtask_run(str(tmp_path / "nope.ipynb"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"nbtask run: error: no notebook at {tmp_path / 'nope.ipynb'}"
    ]
    (tmp_path / "junk.ipynb").write_text("not json")
    junk = nbtask_run(str(tmp_path / "junk.ipynb"))
    assert junk.returncode == 2 and len(junk.stderr.splitlines()) == 1, junk.stderr
    timeout = nbtask_run(
        str(write_notebook(tmp_path / "slow.ipynb", "import time; time.sleep(30)")),
        "--timeout",
        "2",
    )
    assert timeout.returncode == 1
    assert timeout.stderr.startswith("nbtask run: error: cell 1 did not finish within 2 s")
    assert len(timeout.stderr.splitlines()) == 1, timeout.stderr


def test_broker_option_runs_on_a_real_broker(
    settings: Settings, start_worker: Any, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=1)
    notebook = write_notebook(
        tmp_path / "remote.ipynb",
        "%load_ext nbtask",
        "%%task --wait\nimport os\nprint('worker pid', os.getpid())\nanswer = 6 * 7",
        "print('answer', answer)",
    )
    env = {**settings.to_env(), "NBTASK_SECRET": settings.secret or ""}
    env.pop("NBTASK_BROKER", None)
    result = nbtask_run(str(notebook), "--broker", settings.broker_url or "", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"on {settings.broker_url}" in result.stdout
    assert "answer 42" in result.stdout
    pid = int(result.stdout.split("worker pid ")[1].split()[0])
    assert pid in {c.pid for c in worker.children()}


def test_secret_file_option_gives_the_kernel_the_workers_secret(
    settings: Settings, start_worker: Any, tmp_path: Path
) -> None:
    """As ``worker``, ``status`` and the other commands with a broker option take it."""
    worker = start_worker(concurrency=1)
    secret = tmp_path / "secret"
    secret.write_text(f"{settings.secret}\n")
    notebook = write_notebook(
        tmp_path / "signed.ipynb",
        "%load_ext nbtask",
        "%%task --wait\nimport os\nprint('worker pid', os.getpid())",
    )
    env = settings.to_env()
    for given in ("NBTASK_BROKER", "NBTASK_SECRET"):  # by the options only
        env.pop(given, None)
    url = settings.broker_url or ""
    result = nbtask_run(str(notebook), "-b", url, "--secret-file", str(secret), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = int(result.stdout.split("worker pid ")[1].split()[0])
    assert pid in {c.pid for c in worker.children()}


def test_import_nbtask_stays_light() -> None:
    code = (
        "import sys, nbtask, nbtask.cli; "
        "print(sorted(m for m in ('nbclient', 'nbformat', 'IPython', 'ipywidgets', 'kombu') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]"


def test_background_cells_still_running_at_the_end_are_waited_for(tmp_path: Path) -> None:
    made = tmp_path / "trained.txt"
    notebook = write_notebook(
        tmp_path / "background.ipynb",
        "%load_ext nbtask",
        "%%task train\nimport time\nfor i in range(3):\n    print('epoch', i, flush=True)\n"
        f"    time.sleep(0.5)\nopen({str(made)!r}, 'w').write('done')\nmodel = 'trained'",
        "print('last cell')",
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert made.read_text() == "done"
    said = "waiting for 1 cell still queued or running in the background: cell In[2] ('train')"
    assert said in result.stdout
    assert "[train] SUCCESS" in result.stdout
    written = nbformat.read(tmp_path / "background.out.ipynb", as_version=4)
    assert len(written.cells) == 3  # the wait is not a cell of the notebook
    view = written.cells[1].outputs[0]["data"]["text/plain"]
    assert view.startswith("[train] SUCCESS") and "epoch 2" in view, view


def test_a_background_cell_that_fails_after_the_last_cell_fails_the_run(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "late.ipynb",
        "%load_ext nbtask",
        "# the data\nx = 1",
        "%%task split\nimport time\ntime.sleep(1)\nshare = x / 0",
        "%%task fine\ny = x + 1",
        "print('last cell')",
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "nbtask run: error: in the background, cell 3 ('split') failed with ZeroDivisionError: "
        f"division by zero; the executed notebook is in {tmp_path / 'late.out.ipynb'}"
    ], result.stderr
    assert "last cell" in result.stdout
    written = nbformat.read(tmp_path / "late.out.ipynb", as_version=4)
    view = written.cells[2].outputs[0]["data"]["text/plain"]
    assert view.startswith("[split] FAILURE") and "ZeroDivisionError" in view, view


def test_a_background_cell_tagged_raises_exception_may_fail(tmp_path: Path) -> None:
    """As a ``--wait`` cell so tagged may: its failure is in its cell, the run succeeds."""
    notebook = write_notebook(
        tmp_path / "tagged.ipynb",
        "%load_ext nbtask",
        "%%task bg\nimport time\ntime.sleep(1)\nraise ValueError('bg tagged')",
        "%%task --wait\nraise ValueError('wait tagged')",
        "print('last cell')",
        tags={1: ["raises-exception"], 2: ["raises-exception"]},
    )
    result = nbtask_run(str(notebook), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "last cell" in result.stdout
    written = nbformat.read(tmp_path / "tagged.out.ipynb", as_version=4)
    view = written.cells[1].outputs[0]["data"]["text/plain"]
    assert view.startswith("[bg] FAILURE") and "bg tagged" in view, view


def test_background_cells_past_the_timeout_are_cancelled_and_fail_the_run(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "slow.ipynb",
        "%load_ext nbtask",
        "%%task forever\nimport time\ntime.sleep(120)",
        "print('last cell')",
    )
    result = nbtask_run(str(notebook), "--timeout", "3", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(
        "nbtask run: error: in the background, 1 cell still ran 3 s after the last cell, and "
        "was cancelled: cell 2 ('forever') (raise --timeout)"
    ), result.stderr
    written = nbformat.read(tmp_path / "slow.out.ipynb", as_version=4)
    view = written.cells[1].outputs[0]["data"]["text/plain"]
    assert view.startswith("[forever] REVOKED"), view


def started_run(notebook: Path, until: str, *args: str) -> subprocess.Popen[str]:
    """``nbtask run NOTEBOOK`` in the background, once its output showed ``until``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    run = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "run", str(notebook), *args],
        env=base,
        cwd=notebook.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    seen = ""
    while until not in seen:
        line = run.stdout.readline()
        assert line, f"the run ended before {until!r}:\n{seen}{run.communicate()[1]}"
        seen += line
    return run


def test_ctrl_c_on_nbtask_run_cancels_the_cell_and_says_so_in_one_line(tmp_path: Path) -> None:
    """SIGINT: the cell's task is cancelled, the notebook so far written, exit 130. One
    Ctrl-C is one Stop: the task's ``finally`` runs to its end, shown, not killed."""
    notebook = write_notebook(
        tmp_path / "slow.ipynb",
        "%load_ext nbtask",
        "%%task --wait\nimport time\ntry:\n    print('task started', flush=True)\n"
        "    time.sleep(120)\nfinally:\n    print('cleaning up', flush=True)\n"
        "    time.sleep(3)\n    print('cleaned up', flush=True)",
        "print('after')",
    )
    run = started_run(notebook, "task started")
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stdout + stderr
    assert stderr.splitlines() == [
        "nbtask run: interrupted (SIGINT) in cell 2: task 'import time' cancelled; the "
        f"notebook as far as it ran is in {tmp_path / 'slow.out.ipynb'}"
    ], stderr
    assert "Traceback" not in stdout and "after" not in stdout, stdout
    assert "cleaned up" in stdout.split("cleaning up", 1)[-1], stdout
    written = nbformat.read(tmp_path / "slow.out.ipynb", as_version=4)
    (error,) = written.cells[1].outputs[-1:]
    assert (error.output_type, error.ename) == ("error", "KeyboardInterrupt"), error
    assert written.cells[2].execution_count is None


def test_sigterm_while_background_cells_are_waited_for_cancels_them(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "background.ipynb",
        "%load_ext nbtask",
        "%%task bg\nimport time\ntime.sleep(120)",
        "print('last cell')",
    )
    run = started_run(notebook, "[bg] STARTED")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert stderr.splitlines() == [
        "nbtask run: interrupted (SIGTERM) while waiting for the background cells: 1 cell "
        "not done was cancelled: cell 2 ('bg'); the notebook as far as it ran is in "
        f"{tmp_path / 'background.out.ipynb'}"
    ], stderr
    assert "Traceback" not in stdout, stdout
    written = nbformat.read(tmp_path / "background.out.ipynb", as_version=4)
    view = written.cells[1].outputs[0]["data"]["text/plain"]
    assert view.startswith("[bg] REVOKED"), view


def test_a_background_cell_no_worker_can_take_fails_the_run_with_why(
    settings: Settings, tmp_path: Path
) -> None:
    """Not after the whole --timeout (600 s here), and not telling to raise it."""
    notebook = write_notebook(
        tmp_path / "stuck.ipynb",
        "%load_ext nbtask",
        "%%task stuck --queue nobody-serves-this\ny = 1",
        "print('last cell')",
    )
    env = {**settings.to_env(), "NBTASK_SECRET": settings.secret or ""}
    why = (
        "cell 2 ('stuck') never started: no live worker consumes queue 'nobody-serves-this' "
        "(start one: nbtask worker -Q nobody-serves-this)"
    )
    result = nbtask_run(str(notebook), env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"nbtask run: error: in the background, {why}; the executed notebook is in "
        f"{tmp_path / 'stuck.out.ipynb'}"
    ], result.stderr
    written = nbformat.read(tmp_path / "stuck.out.ipynb", as_version=4)
    view = written.cells[1].outputs[0]["data"]["text/plain"]
    assert view.startswith("[stuck] REVOKED"), view
    # A timeout shorter than the 10 s of grace: the same reason, and no advice to raise it.
    result = nbtask_run(str(notebook), "--timeout", "6", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(
        "nbtask run: error: in the background, 1 cell still ran 6 s after the last cell, and "
        f"was cancelled: {why}; the executed"
    ), result.stderr
