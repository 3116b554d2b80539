"""The quickstart in a real browser: JupyterLab + Playwright driving Debian's chromium.

Everything is asserted from the page itself: the widget renders, its progress bar
advances, the task's printed output streams in, the result shows, and the widget's Cancel
button stops a running task (its badge then reads REVOKED). A cell printing a lot shows all
of it, in order, for bytes received by the page linear in what it printed. Screenshots are
saved in ``test-artifacts/`` (git-ignored); ``docs/widget.png`` in the README is one of them.

This tier never skips itself: without chromium or Playwright it fails, saying how to
install them (``.ci/run`` does it on a fresh machine). Never ``playwright install``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import ROOT, free_port
from nbformat.v4 import new_code_cell, new_notebook

CHROMIUM = "/usr/bin/chromium"
TOKEN = "nbtask-browser-test"
ARTIFACTS = ROOT / "test-artifacts"
# --headless and a fresh profile come from Playwright.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_IDLE = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session
              && w.sessionContext.session.kernel;
    return k && k.status === 'idle'; }"""
RUN_CELL = """(i) => {
    const panel = window.jupyterapp.shell.currentWidget;
    panel.content.activeCellIndex = i;
    window.jupyterapp.commands.execute('notebook:run-cell');
}"""
SOURCES = """() => window.jupyterapp.shell.currentWidget.content.widgets.map(
    c => c.model.type === 'code' ? c.model.sharedModel.getSource() : '')"""

# A cell printing 0.4 MB over a few seconds, with a display it updates by id as it goes.
PRINTER = """%%task printer
import time
from IPython.display import display
progress = display('progress 0', display_id=True)
for step in range(200):
    print(''.join(f'step {step:>3} line {i:>2} ' + '.' * 80 + chr(10) for i in range(20)))
    progress.update(f'progress {step + 1}')
    time.sleep(0.02)
"""
PRINTED = 200 * (20 * len(f"step   0 line  0 {'.' * 80}\n") + 1)  # print() adds a newline

FAILING = "%%task failing\nx = 1\nraise KeyError('missing')"
LONG_NAME = "a_task_whose_name_is_far_too_long_for_its_column_" * 4

pytestmark = pytest.mark.timeout(300)


def _playwright() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"the browser tier needs Debian's chromium at {CHROMIUM}: "
            "apt-get update && apt-get install -y chromium (do not run `playwright install`)"
        )
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the browser tier needs Playwright: pip install -e '.[test]'")
    return sync_api


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab on a free port, serving a temp dir holding a copy of the quickstart."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", root)
    nbformat.write(
        new_notebook(
            cells=[new_code_cell("%load_ext nbtask"), new_code_cell(PRINTER)],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        ),
        root / "printer.ipynb",
    )
    nbformat.write(  # the same cell, shown by the text view, then a cell run meanwhile
        new_notebook(
            cells=[
                new_code_cell("%env NBTASK_WIDGETS=0\n%load_ext nbtask"),
                new_code_cell(PRINTER),
                new_code_cell("print('meanwhile')"),
            ],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        ),
        root / "text-view.ipynb",
    )
    nbformat.write(  # a background cell that fails, and the board with a long name
        new_notebook(
            cells=[
                new_code_cell("%load_ext nbtask"),
                new_code_cell(FAILING),
                new_code_cell(f"%%task {LONG_NAME}\nx = 2"),
                new_code_cell("%tasks"),
            ],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        ),
        root / "failing.ipynb",
    )
    cfg = tmp_path / "cfg"
    (cfg / "labconfig").mkdir(parents=True)  # no news/update toast over the screenshot
    (cfg / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env.update(
        JUPYTER_CONFIG_DIR=str(cfg),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
        IPYTHONDIR=str(tmp_path / "ipy"),
    )
    port = free_port()
    log_path = tmp_path / "lab.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={root}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
                f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited:\n{log_path.read_text()}")
            try:
                request = urllib.request.Request(
                    f"{url}/api/status", headers={"Authorization": f"token {TOKEN}"}
                )
                urllib.request.urlopen(request, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not answer:\n{log_path.read_text()}")
        yield url
    finally:
        proc.terminate()  # the server shuts its kernel down (and the embedded cluster with it)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bar_width(cell: Any) -> float:
    bar = cell.locator(".widget-hprogress .progress-bar").first
    return float(bar.evaluate("e => parseFloat(e.style.width) || 0"))


def test_quickstart_widget_live_in_jupyterlab(lab: str) -> None:
    sync_api = _playwright()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{lab}/lab/tree/quickstart.ipynb?token={TOKEN}")
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            sources: list[str] = page.evaluate(SOURCES)

            def index(snippet: str) -> int:
                return next(i for i, s in enumerate(sources) if snippet in s)

            cells = page.locator(".jp-Notebook .jp-Cell")

            def run(i: int) -> Any:
                page.evaluate(RUN_CELL, i)
                return cells.nth(i)

            def run_until_idle(i: int, timeout: float = 60) -> Any:
                cell = run(i)
                # the prompt shows a number (not "*" or blank) once the cell has finished
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    prompt = cell.locator(".jp-InputPrompt").first.inner_text()
                    if any(ch.isdigit() for ch in prompt):
                        return cell
                    time.sleep(0.1)
                raise AssertionError(f"cell {i} still running: {prompt!r}")

            run_until_idle(index("%load_ext nbtask"))
            assert "embedded cluster" in cells.nth(index("%load_ext nbtask")).inner_text()
            run_until_idle(index("size = 150_000"))

            # The widget renders and its bar advances while the task runs.
            crunch = run(index("%%task crunch"))
            badge = crunch.locator(".widget-html").first
            badge.wait_for(timeout=30_000)
            crunch.locator(".widget-hprogress .progress-bar").first.wait_for()
            widths: list[float] = []
            good_shot = False  # mid-way, with some output: the picture for the README
            deadline = time.monotonic() + 60
            while "SUCCESS" not in badge.inner_text() and time.monotonic() < deadline:
                widths.append(bar_width(crunch))
                if not good_shot and 0 < widths[-1] < 100:
                    crunch.screenshot(path=str(ARTIFACTS / "widget-running.png"))
                    page.screenshot(path=str(ARTIFACTS / "quickstart-running.png"))
                    good_shot = 25 < widths[-1] < 75 and "chunk 5" in crunch.inner_text()
                time.sleep(0.2)
            assert "SUCCESS" in badge.inner_text(), (badge.inner_text(), widths)
            moving = [w for w in widths if 0 < w < 100]
            assert len(set(moving)) >= 2 and moving == sorted(moving), widths
            assert bar_width(crunch) == 100.0
            bar_class = crunch.locator(".widget-hprogress .progress-bar").first
            assert "progress-bar-success" in (bar_class.get_attribute("class") or "")
            # Streamed output and the result (the last expression) show in the widget.
            crunch_text = crunch.inner_text()
            for expected in ("chunk 0 done", "chunk 15 done", "22499775000500000"):
                assert expected in crunch_text, crunch_text
            crunch.screenshot(path=str(ARTIFACTS / "widget-done.png"))

            # Variables come back to the notebook.
            values = run_until_idle(index('print("total ='))
            assert "total = 22499775000500000" in values.inner_text()

            # A plot made on a worker is an image in the cell.
            plot = run_until_idle(index("import matplotlib.pyplot"))
            plot.locator(".jp-OutputArea-output img").first.wait_for(timeout=30_000)

            # The failing cell shows the user's own traceback.
            failing = run_until_idle(index("ratio(1, 0)"))
            failing.get_by_text("ZeroDivisionError: division by zero").first.wait_for()
            assert "ratio(1, 0)" in failing.inner_text()

            # Cancel from the widget: the running task stops and its badge reads REVOKED.
            sleeper = run(index("%%task sleeper"))
            sleeper_badge = sleeper.locator(".widget-html").first
            sleeper_badge.wait_for(timeout=30_000)
            deadline = time.monotonic() + 30
            while bar_width(sleeper) <= 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert bar_width(sleeper) > 0, "running: the bar has moved"
            assert not any(s in sleeper_badge.inner_text() for s in ("REVOKED", "SUCCESS"))
            sleeper.get_by_role("button", name="Cancel").click()
            page.wait_for_function(
                "(e) => e.innerText.includes('REVOKED')",
                arg=sleeper_badge.element_handle(),
                timeout=20_000,
            )
            assert bar_width(sleeper) < 50, "stopped long before the end"
            sleeper.screenshot(path=str(ARTIFACTS / "widget-revoked.png"))

            board = run_until_idle(index("%tasks"))
            assert "REVOKED" in board.inner_text() and "SUCCESS" in board.inner_text()
            page.screenshot(path=str(ARTIFACTS / "quickstart-done.png"), full_page=True)
            assert errors == [], errors
        finally:
            browser.close()


@contextlib.contextmanager
def _counting_frames(lab: str, notebook: str) -> Iterator[tuple[Any, Any, list[int]]]:
    """JupyterLab open on ``notebook``, its first cell (``%load_ext nbtask``) run.

    Yields the page, its cells and the sizes of the websocket frames the browser received
    since that cell ended.
    """
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            received: list[int] = []
            page.on(
                "websocket",
                lambda ws: ws.on("framereceived", lambda frame: received.append(len(frame))),
            )
            page.goto(f"{lab}/lab/tree/{notebook}?token={TOKEN}")
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            cells = page.locator(".jp-Notebook .jp-Cell")
            page.evaluate(RUN_CELL, 0)
            cells.nth(0).get_by_text("worker process").first.wait_for(timeout=90_000)
            page.wait_for_function(KERNEL_IDLE, timeout=30_000)
            received.clear()
            yield page, cells, received
        finally:
            browser.close()


def _shows_all_printed(text: str, received: list[int]) -> None:
    """``text`` holds every line :data:`PRINTER` printed, in order, and its last progress;
    the browser received less than four times what was printed."""
    assert sum(received) < 4 * PRINTED, (sum(received), PRINTED)
    wanted = [f"step {step:>3} line {i:>2} " for step in range(200) for i in range(20)]
    where = [text.find(line) for line in wanted]
    assert -1 not in where and where == sorted(where)  # all of it, in order
    assert "progress 200" in text and "progress 0'" not in text


def test_a_cell_printing_a_lot_shows_all_of_it_for_bytes_linear_in_it(lab: str) -> None:
    with _counting_frames(lab, "printer.ipynb") as (page, cells, received):
        page.evaluate(RUN_CELL, 1)
        badge = cells.nth(1).locator(".widget-html").first
        badge.wait_for(timeout=30_000)
        page.wait_for_function(
            "(e) => e.innerText.includes('SUCCESS')",
            arg=badge.element_handle(),
            timeout=60_000,
        )
        cells.nth(1).get_by_text("step 199 line 19").wait_for(timeout=10_000)
        # Everything the browser received for the cell (widgets, status, output) while
        # it ran: resending all output at each repaint took 13 MB here.
        _shows_all_printed(cells.nth(1).locator(".jp-Cell-outputArea").inner_text(), received)


def test_the_text_view_shows_all_output_under_its_cell_for_bytes_linear_in_it(
    lab: str,
) -> None:
    with _counting_frames(lab, "text-view.ipynb") as (page, cells, received):
        page.evaluate(RUN_CELL, 1)
        output = cells.nth(1).locator(".jp-Cell-outputArea")
        output.get_by_text("step   5 line").first.wait_for(timeout=30_000)
        page.evaluate(RUN_CELL, 2)  # runs while the task prints: a cell of its own
        meanwhile = cells.nth(2).locator(".jp-Cell-outputArea")
        meanwhile.get_by_text("meanwhile", exact=True).wait_for(timeout=10_000)
        output.get_by_text("SUCCESS").wait_for(timeout=60_000)
        output.get_by_text("step 199 line 19").wait_for(timeout=10_000)
        # Resending all output at each repaint took 14 MB here.
        _shows_all_printed(output.inner_text(), received)
        assert "step" not in meanwhile.inner_text()


def test_a_background_cells_failure_and_the_board_read_well_in_jupyterlab(lab: str) -> None:
    """The widget shows the traceback in colour, as a kernel shows the cell's error; the
    board keeps a long name inside its column, cut with an ellipsis, whole in its tooltip."""
    ARTIFACTS.mkdir(exist_ok=True)
    with _counting_frames(lab, "failing.ipynb") as (page, cells, _received):
        page.evaluate(RUN_CELL, 1)
        failing = cells.nth(1)
        badge = failing.locator(".widget-html").first
        badge.wait_for(timeout=30_000)
        page.wait_for_function(
            "(e) => e.innerText.includes('FAILURE')",
            arg=badge.element_handle(),
            timeout=60_000,
        )
        # IPython's colours, rendered by the frontend, and the cell's failing line.
        shown = failing.locator(".widget-output .jp-OutputArea-output")
        shown.locator(".ansi-red-fg").first.wait_for(timeout=10_000)
        text = shown.last.inner_text()
        assert "----> 3 raise KeyError('missing')" in text, text
        assert text.rstrip().endswith("KeyError: 'missing'"), text
        failing.screenshot(path=str(ARTIFACTS / "widget-failure.png"))

        page.evaluate(RUN_CELL, 2)
        cells.nth(2).locator(".widget-html").first.wait_for(timeout=30_000)
        page.evaluate(RUN_CELL, 3)
        board = cells.nth(3)
        name = board.get_by_title(LONG_NAME)
        name.wait_for(timeout=30_000)
        cut = name.evaluate(
            "e => e.scrollWidth > e.clientWidth && getComputedStyle(e).textOverflow === 'ellipsis'"
        )
        box = name.bounding_box()
        area = board.locator(".jp-OutputArea-output").first.bounding_box()
        assert cut, "the long name is cut in its column"
        assert box is not None and area is not None
        assert box["x"] + box["width"] <= area["x"] + area["width"], (box, area)
        assert board.get_by_role("button", name="Open").first.is_visible()
        board.screenshot(path=str(ARTIFACTS / "board-long-name.png"))
