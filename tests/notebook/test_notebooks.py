"""The example notebooks, executed top to bottom with nbclient as a frontend would run them.

quickstart and functions run on the embedded cluster; cluster talks to the real Redis with
``nbtask worker`` processes started here first (one per queue), as its text tells a user to.
Widgets stay on (the kernel believes a frontend is there), like a run in JupyterLab.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import ROOT, WIDGET_VIEW
from nbclient import NotebookClient

from nbtask import Settings
from nbtask.cli import _parser
from nbtask.cli.options import settings_for

NOTEBOOKS = ROOT / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# The quickstart's crunch cell: 20 chunks of sum(i * i for i < 150_000).
CRUNCH_TOTAL = 20 * (149_999 * 150_000 * 299_999 // 6)

pytestmark = pytest.mark.timeout(180)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env.update(extra)
    return env


def execute(name: str, env: dict[str, str]) -> Any:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=env)  # raises on an error in a cell not tagged raises-exception
    nbformat.validate(nb)
    return nb


def code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_with(nb: Any, snippet: str) -> Any:
    """The first code cell whose source contains ``snippet``."""
    found = [c for c in code_cells(nb) if snippet in c.source]
    assert found, f"no cell containing {snippet!r}"
    return found[0]


def cell_exactly(nb: Any, source: str) -> Any:
    """The code cell whose whole source is ``source``."""
    (found,) = [c for c in code_cells(nb) if c.source == source]
    return found


def text(cell: Any) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(str(out.get("data", {}).get("text/plain", "")))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))


def held_by(status: str, pid: int) -> list[str]:
    """The lines ``%nbtask status`` lists under worker process ``pid``: what it holds."""
    lines = status.splitlines()
    (start,) = [i for i, line in enumerate(lines) if f"(pid {pid}) holds" in line]
    depth = len(lines[start]) - len(lines[start].lstrip())
    below = itertools.takewhile(lambda line: line[: depth + 1].isspace(), lines[start + 1 :])
    return [line.strip() for line in below]


def assert_no_unexpected_errors(nb: Any) -> None:
    for cell in code_cells(nb):
        assert cell.execution_count is not None, f"cell did not run: {cell.source[:60]!r}"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if "raises-exception" not in cell.metadata.get("tags", []):
            assert not errors, f"{cell.source[:60]!r} failed:\n{text(cell)}"


def setup_commands(nb: Any) -> list[list[str]]:
    """The shell commands of the notebook's markdown ``bash`` blocks, as words."""
    commands = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for block in re.findall(r"```bash\n(.*?)```", cell.source, re.DOTALL):
                lines = block.splitlines()
                commands += [words for ln in lines if (words := shlex.split(ln, comments=True))]
    return commands


@pytest.mark.parametrize("name", ["cluster.ipynb", "data.ipynb"])
def test_setup_commands_start_workers_as_written(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``nbtask worker`` a notebook tells the user to start finds its broker and secret.

    In a fresh shell: only what the block itself exports is set (its secret's value made up).
    """
    for var in [v for v in os.environ if v.startswith("NBTASK_")]:
        monkeypatch.delenv(var)
    parser, _ = _parser()
    workers = 0
    for line in setup_commands(nbformat.read(NOTEBOOKS / name, as_version=4)):
        if line[0] == "export":
            var, _, value = line[1].partition("=")
            monkeypatch.setenv(var, "0" * 64 if value.startswith("$(") else value)
            continue
        words = list(itertools.dropwhile(lambda w: re.match(r"^[A-Z_]+=", w), line))
        if words[:2] == ["nbtask", "worker"]:
            settings = settings_for(parser.parse_args(words[1:]))
            assert settings.broker_url == "redis://127.0.0.1:6379/0", words
            workers += 1
    assert workers == 2, f"{name}: the two workers it describes"


def test_quickstart() -> None:
    nb = execute("quickstart.ipynb", clean_env())
    assert_no_unexpected_errors(nb)

    assert "embedded cluster" in text(cell_with(nb, "%load_ext nbtask"))
    crunch = cell_with(nb, "%%task crunch")
    assert any(WIDGET_VIEW in o.get("data", {}) for o in crunch.outputs), crunch.outputs

    values = text(cell_with(nb, 'print("total ='))
    assert f"total = {CRUNCH_TOTAL}" in values
    assert "last step = 19" in values
    assert "waiting for task 'crunch'" in values

    plot = cell_with(nb, "import matplotlib.pyplot")
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), plot.outputs
    assert "peak: 0.828" in text(plot)

    failing = next(c for c in code_cells(nb) if "raises-exception" in c.metadata.get("tags", []))
    errors = [o for o in failing.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["ZeroDivisionError"]
    trace = text(failing)
    assert "ratio(1, 0)" in trace and "return a / b" in trace, trace

    assert "long_task is REVOKED" in text(cell_with(nb, "from concurrent.futures"))
    board = text(cell_with(nb, "%tasks"))
    assert "crunch" in board and "SUCCESS" in board and "REVOKED" in board, board
    assert "worker" in text(cell_with(nb, "%nbtask status"))

    # The widgets a frontend would draw were saved with the notebook.
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    models = {m["model_name"] for m in state.values()}
    assert {"FloatProgressModel", "ButtonModel", "OutputModel", "HTMLModel"} <= models


def test_functions() -> None:
    audit_logs = Path(tempfile.gettempdir()).glob
    before = set(audit_logs("nbtask-audit-*.log"))
    nb = execute("functions.ipynb", clean_env())
    assert_no_unexpected_errors(nb)
    out = "\n".join(text(c) for c in code_cells(nb))
    for expected in [
        "5 SUCCESS",
        "['at', '0', 'at', '2', 'at', '4']",
        "succeeded on attempt 3",
        "gave up: ConnectionError the service is busy",
        "predictions: [0.5, 4.0, 11.5, 23.0, 38.5, 58.0]",
        "divide(1, 0) raised ZeroDivisionError",
        "success (6, 3) -> 2.0",
        "failure (1, 0): ZeroDivisionError: division by zero",
        "chain: 113",
        "group: [0, 2, 4, 6, 8, 10, 12, 14]",
    ]:
        assert expected in out, f"{expected!r} not in:\n{out}"
    loads = re.search(r"6 calls, (\d) model load", out)
    assert loads and 1 <= int(loads[1]) <= 2, out  # once per worker process, not per call
    took = re.search(r"10 calls at 10/s took ([\d.]+) s", out)
    assert took and float(took[1]) >= 0.5, out  # rate limited: not all at once
    assert set(audit_logs("nbtask-audit-*.log")) <= before  # it leaves its file behind no more


def test_cluster(
    settings: Settings, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x,y\n1,2\n3,4\n")
    (data / "b.csv").write_text("x\n1\n")
    start_worker("-Q", "default", concurrency=2)
    monkeypatch.setenv("DATA_DIR", str(data))
    near = start_worker("-Q", "near-data", concurrency=1)
    monkeypatch.delenv("DATA_DIR")

    env = clean_env(**{**settings.to_env(), "NBTASK_SECRET": settings.secret or ""})
    env.pop("NBTASK_BROKER", None)  # the notebook's %nbtask connect picks the broker
    assert settings.broker_url == "redis://127.0.0.1:6379/0", "the notebook names this URL"
    nb = execute("cluster.ipynb", env)
    assert_no_unexpected_errors(nb)

    assert "redis://127.0.0.1:6379/0, 3 worker processes" in text(cell_with(nb, "%nbtask connect"))
    status = text(cell_with(nb, "%nbtask status"))
    assert "queues near-data" in status and "queues default" in status, status

    near_cell = cell_with(nb, "%%task --wait --queue near-data")
    counted = re.search(r"2 files counted on the near-data worker \((\d+)\)", text(near_cell))
    assert counted, text(near_cell)
    assert int(counted[1]) in {c.pid for c in near.children()}, "routed to the near-data worker"
    assert "rows per file: {'a.csv': 3, 'b.csv': 2}" in text(cell_with(nb, 'print("rows'))
    functions = text(cell_with(nb, 'App("cluster"'))
    assert "total rows, counted next to the data: 5" in functions
    assert "6 tasks on the default queue ran in" in functions


def test_data(settings: Settings, start_worker: Any) -> None:
    catalog = start_worker("--data", "catalog=notebooks.datademo:load_catalog", concurrency=1)
    weather = start_worker("--data", "weather=notebooks.datademo:load_weather", concurrency=1)
    env = clean_env(**{**settings.to_env(), "NBTASK_SECRET": settings.secret or ""})
    env.pop("NBTASK_BROKER", None)  # the notebook's %nbtask connect picks the broker
    assert settings.broker_url == "redis://127.0.0.1:6379/0", "the notebook names this URL"
    nb = execute("data.ipynb", env)
    assert_no_unexpected_errors(nb)

    status = text(cell_with(nb, "%nbtask status"))
    assert "datasets catalog" in status and "datasets weather" in status, status
    for group, snippet in ((catalog, "--requires catalog"), (weather, "--requires weather")):
        ran = re.search(r"where the \w+ is \(worker process (\d+)\)", text(cell_with(nb, snippet)))
        assert ran and int(ran[1]) in {c.pid for c in group.children()}, "routed to its data"
    assert "'star': 1" in text(cell_exactly(nb, "kinds")), "the catalog's counts came back"
    preview = text(cell_exactly(nb, "grid"))
    assert "kept on the workers" in preview and "shape=(3000, 3000)" in preview, preview
    assert "72,000,000 bytes" in preview, preview
    assert re.search(r"array\(\[0\.\d+", text(cell_exactly(nb, "column_means")))
    making, follow_up = cell_with(nb, "grid = np.random"), cell_with(nb, "column_means = grid")
    made = re.search(r"grid made by worker process (\d+)", text(making))
    used = re.search(r"grid used in place by worker process (\d+)", text(follow_up))
    assert made and used, (text(making), text(follow_up))
    holder = int(made[1])
    assert holder in {c.pid for group in (catalog, weather) for c in group.children()}
    assert int(used[1]) == holder, "the follow-up cell ran on the process that holds grid"
    *_, after = [c for c in code_cells(nb) if c.source == "%nbtask status"]
    held = held_by(text(after), holder)
    assert f"grid  72.0 MB from Cell In[{making.execution_count}]" in held, text(after)
    assert "fetching grid (72.0 MB)" in text(cell_with(nb, "grid[:2, :3]"))
    assert re.search(r"brightest galaxy: \d", text(cell_with(nb, "def brightest")))
