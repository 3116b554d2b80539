"""Does ``%%task --wait`` change anything but where a cell runs? Measured on notebooks.

For one notebook (a folder under ``tests/notebooks/`` holding one ``.ipynb``) this module

1. runs it plainly, top to bottom, in a fresh kernel with nbclient (cwd = the notebook's
   folder), twice, and checks that the two plain runs agree cell by cell;
2. runs it once more in a fresh kernel where an injected first cell does
   ``%load_ext nbtask`` and every non-empty code cell gets a first line ``%%task --wait``
   (a cell that starts with its own cell magic keeps it, under the ``%%task`` line);
3. normalises the outputs of each code cell and compares the ``%%task`` run with the first
   plain run.

Only the public magics are used. What the comparison looks at, per code cell, in order:

- ``stdout`` and ``stderr`` text (consecutive chunks of one stream are joined, since where
  a stream is cut is not part of what a reader sees);
- ``execute_result`` and ``display_data`` bundles: ``text/plain``, ``text/html`` and every
  other text type verbatim; ``image/png`` by decoded pixels (size and RGBA bytes), so PNG
  metadata may differ; a widget view by its model's class and state, read from the
  widget state nbclient saves with the notebook;
- errors by ``ename`` (the ``evalue`` is shown in diffs but not compared).

What is masked, and why (nothing else is): execution counts; output metadata; memory
addresses ``0x...`` (they differ between two plain runs too); widget model ids (random
UUIDs), which are replaced by their order of first appearance; and the output of the
injected ``%load_ext nbtask`` cell, which is not a cell of the notebook.

The kernels get the caller's environment without ``NBTASK_*`` variables (so the
``%%task`` run starts its own embedded cluster) and with ``PYTHONHASHSEED=0``: set
iteration order (and so, e.g., which of two equally good answers ``max`` picks) otherwise
changes from one fresh interpreter to the next, which would make two plain runs disagree
for reasons that have nothing to do with nbtask. Worker processes inherit the variable.
To test a particular checkout of nbtask, put it first on ``PYTHONPATH``.

``python tests/notebooks/fidelity.py [NAME ...] [--diff] [--json FILE]`` prints a summary
table for every notebook here (or the named ones); ``--diff`` adds each differing cell's
diff.
"""

from __future__ import annotations

import argparse
import base64
import copy
import difflib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TASK_LINE = "%%task --wait"
LOAD_EXT = "%load_ext nbtask"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CELL_TIMEOUT = 120  # seconds; the slowest cell here takes a few

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,16}")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------- running


def notebook_path(name_or_path: str | Path) -> Path:
    """The ``.ipynb`` of a notebook folder under ``tests/notebooks`` (or a path to one)."""
    path = Path(name_or_path)
    if path.suffix == ".ipynb":
        return path.resolve()
    folder = path if path.is_dir() else HERE / str(name_or_path)
    found = sorted(folder.glob("*.ipynb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .ipynb in {folder}, found {len(found)}")
    return found[0].resolve()


def all_notebooks() -> list[str]:
    """The folder names of the collected notebooks, sorted."""
    return sorted(p.parent.name for p in HERE.glob("*/*.ipynb"))


def kernel_env() -> dict[str, str]:
    """The caller's environment, without ``NBTASK_*``, with a fixed hash seed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env["PYTHONHASHSEED"] = "0"
    return env


def with_task_lines(nb: Any) -> Any:
    """A copy of ``nb``: ``%load_ext nbtask`` first, ``%%task --wait`` atop each code cell."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type == "code" and cell.source.strip():
            cell.source = f"{TASK_LINE}\n{cell.source}"
    first = nbformat.v4.new_code_cell(LOAD_EXT)
    first.id = "nbtask-fidelity-load-ext"
    out.cells.insert(0, first)
    return out


def execute(nb: Any, cwd: Path, timeout: int = CELL_TIMEOUT) -> tuple[Any, float]:
    """Run ``nb`` in a fresh kernel (errors do not stop the run); return it and seconds.

    The kernel talks over IPC sockets rather than TCP ports, so kernels started at the same
    moment by other processes on the machine cannot take its ports.
    """
    from jupyter_client.manager import KernelManager

    nb = copy.deepcopy(nb)
    with tempfile.TemporaryDirectory(prefix="nbtask-fidelity-") as sockets:
        client = NotebookClient(
            nb,
            # An absolute socket path: the kernel's cwd is the notebook's folder, not ours.
            km=KernelManager(kernel_name="python3", transport="ipc", ip=f"{sockets}/kernel"),
            timeout=timeout,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": str(cwd)}},
        )
        started = time.monotonic()
        client.execute(env=kernel_env())
        return nb, time.monotonic() - started


# ----------------------------------------------------------------------- normalising


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _mask(text: str) -> str:
    return _ADDRESS.sub("0x…", _ANSI.sub("", text))


def _png(data: str) -> dict[str, Any]:
    from PIL import Image

    raw = base64.b64decode(data)
    image = Image.open(io.BytesIO(raw)).convert("RGBA")
    pixels = image.tobytes()
    return {
        "size": list(image.size),
        "pixels": hashlib.sha256(pixels).hexdigest()[:16],
        "_raw": data,  # kept for measuring how many pixels differ; never compared
    }


class _Ids:
    """Widget model ids, renamed by order of first appearance within one run."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.names: dict[str, str] = {}

    def name(self, model_id: str) -> str:
        if model_id not in self.names:
            self.names[model_id] = f"<model {len(self.names) + 1}>"
        return self.names[model_id]

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("IPY_MODEL_"):
                return "IPY_MODEL_" + self.name(value[len("IPY_MODEL_") :])
            if value in self.state or re.fullmatch(r"[0-9a-f]{32}", value):
                return self.name(value)
            return value
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        return value

    def view(self, bundle: dict[str, Any]) -> dict[str, Any]:
        model_id = bundle.get("model_id", "")
        model = self.state.get(model_id)
        if model is None:
            return {"model": self.name(model_id), "state": "<not in the saved widget state>"}
        st = model.get("state", {})
        kept = {k: v for k, v in st.items() if k not in ("layout", "style")}
        return {
            "model": self.name(model_id),
            "class": f"{model.get('model_module')}.{model.get('model_name')}",
            "state": self.scrub(kept),
        }


def widget_state(nb: Any) -> dict[str, Any]:
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    return dict(widgets.get("state", {}))


def normalise_outputs(outputs: list[Any], ids: _Ids) -> list[dict[str, Any]]:
    """One cell's outputs as comparable items (see the module docstring)."""
    items: list[dict[str, Any]] = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            text = _mask(_text(out.get("text", "")))
            if items and items[-1]["kind"] == "stream" and items[-1]["name"] == out["name"]:
                items[-1]["text"] += text
            else:
                items.append({"kind": "stream", "name": out["name"], "text": text})
        elif kind in ("execute_result", "display_data"):
            data = {}
            for mime, value in sorted(out.get("data", {}).items()):
                if mime == "image/png":
                    data[mime] = _png(_text(value))
                elif mime == WIDGET_VIEW:
                    data[mime] = ids.view(dict(value))
                elif isinstance(value, (dict, list)) and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                ):
                    data[mime] = ids.scrub(json.loads(json.dumps(value)))
                else:
                    data[mime] = _mask(_text(value))
            items.append({"kind": kind, "data": data})
        elif kind == "error":
            items.append(
                {"kind": "error", "ename": out.get("ename", ""), "evalue": out.get("evalue", "")}
            )
    return items


def _comparable(items: list[dict[str, Any]]) -> list[Any]:
    """What is compared: everything but error values and raw image bytes."""
    result = []
    for item in items:
        if item["kind"] == "error":
            result.append({"kind": "error", "ename": item["ename"]})
        elif item["kind"] in ("execute_result", "display_data"):
            data = {
                mime: (
                    {k: v for k, v in value.items() if k != "_raw"}
                    if mime == "image/png"
                    else value
                )
                for mime, value in item["data"].items()
            }
            result.append({"kind": item["kind"], "data": data})
        else:
            result.append(item)
    return result


def render(items: list[dict[str, Any]]) -> list[str]:
    """Readable lines for a diff."""
    lines: list[str] = []
    for item in items:
        if item["kind"] == "stream":
            for line in item["text"].splitlines() or [""]:
                lines.append(f"[{item['name']}] {line}")
        elif item["kind"] == "error":
            lines.append(f"[error] {item['ename']}: {item['evalue']}")
        else:
            for mime, value in item["data"].items():
                head = f"[{item['kind']} {mime}]"
                if mime == "image/png":
                    lines.append(
                        f"{head} {value['size'][0]}x{value['size'][1]} px, pixels {value['pixels']}"
                    )
                elif isinstance(value, str):
                    for line in value.splitlines() or [""]:
                        lines.append(f"{head} {line}")
                else:
                    lines.append(f"{head} {json.dumps(value, sort_keys=True)}")
    return lines


def _pixel_notes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    """For images at the same position with the same size: how many pixels differ."""
    import numpy as np
    from PIL import Image

    def pngs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i["data"]["image/png"] for i in items if "image/png" in i.get("data", {})]

    notes = []
    for n, (x, y) in enumerate(zip(pngs(a), pngs(b), strict=False), 1):
        if x["pixels"] != y["pixels"] and x["size"] == y["size"]:
            ax = np.asarray(Image.open(io.BytesIO(base64.b64decode(x["_raw"]))).convert("RGBA"))
            ay = np.asarray(Image.open(io.BytesIO(base64.b64decode(y["_raw"]))).convert("RGBA"))
            share = float((ax != ay).any(axis=-1).mean())
            notes.append(f"image {n}: same size, {share:.1%} of pixels differ")
    return notes


# ------------------------------------------------------------------------- comparing


@dataclass
class CellReport:
    """One code cell: ``identical``, ``differs``, ``unstable`` or ``by design``.

    ``differs``: plain and ``%%task`` runs disagree; ``unstable``: two plain runs do;
    ``by design``: it differs, and its metadata says why it must (``nbtask.by_design``).
    """

    index: int  # 1-based among the notebook's code cells
    source: str
    status: str
    diff: str = ""
    task_error: str = ""  # "ename: evalue" of an error the %%task run raised, if any
    plain_error: str = ""


@dataclass
class NotebookReport:
    """A notebook's per-cell comparison and the run times."""

    name: str
    cells: list[CellReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def identical(self) -> int:
        return sum(c.status == "identical" for c in self.cells)

    @property
    def plain_runs_agree(self) -> bool:
        return not any(c.status == "unstable" for c in self.cells)

    def differing(self) -> list[CellReport]:
        return [c for c in self.cells if c.status not in ("identical", "by design")]

    def format_failures(self) -> str:
        parts = []
        for c in self.differing():
            parts.append(
                f"--- {self.name} code cell {c.index} ({c.status}) ---\n{c.source}\n{c.diff}"
            )
        return "\n\n".join(parts)


def _code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


DIFF_LINES = 60  # a cell's diff is cut after this many lines (the count of the rest is shown)


def _diff(a: list[dict[str, Any]], b: list[dict[str, Any]], la: str, lb: str) -> str:
    lines = list(difflib.unified_diff(render(a), render(b), la, lb, lineterm="", n=2))
    if len(lines) > DIFF_LINES:
        lines = [*lines[:DIFF_LINES], f"... ({len(lines) - DIFF_LINES} more diff lines)"]
    lines += _pixel_notes(a, b)
    return "\n".join(lines)


def _first_error(items: list[dict[str, Any]]) -> str:
    for item in items:
        if item["kind"] == "error":
            return f"{item['ename']}: {item['evalue']}"
    return ""


def compare_runs(name: str, plain1: Any, plain2: Any, task: Any) -> NotebookReport:
    """Compare three executed copies of one notebook (``task`` has the injected cell)."""
    report = NotebookReport(name)
    cells = {
        "plain": (_code_cells(plain1), _Ids(widget_state(plain1))),
        "plain2": (_code_cells(plain2), _Ids(widget_state(plain2))),
        "task": (_code_cells(task)[1:], _Ids(widget_state(task))),
    }
    n = len(cells["plain"][0])
    assert len(cells["plain2"][0]) == n == len(cells["task"][0]), "cell counts differ"
    for i in range(n):
        norm = {k: normalise_outputs(cs[i].outputs, ids) for k, (cs, ids) in cells.items()}
        source = cells["plain"][0][i].source
        cell = CellReport(
            index=i + 1,
            source=source,
            status="identical",
            task_error=_first_error(norm["task"]),
            plain_error=_first_error(norm["plain"]),
        )
        if _comparable(norm["plain"]) != _comparable(norm["plain2"]):
            cell.status = "unstable"
            cell.diff = "the two plain runs disagree:\n" + _diff(
                norm["plain"], norm["plain2"], "plain run 1", "plain run 2"
            )
        elif _comparable(norm["plain"]) != _comparable(norm["task"]):
            why = cells["plain"][0][i].metadata.get("nbtask", {}).get("by_design")
            cell.status = "by design" if why else "differs"
            cell.diff = _diff(norm["plain"], norm["task"], "plain", "%%task --wait")
        report.cells.append(cell)
    return report


def check_notebook(name_or_path: str | Path, keep: Path | None = None) -> NotebookReport:
    """Run one notebook plainly twice and under ``%%task --wait``; compare cell by cell.

    With ``keep``, the three executed copies are written there for a closer look.
    """
    path = notebook_path(name_or_path)
    nb = nbformat.read(path, as_version=4)
    plain1, t1 = execute(nb, path.parent)
    plain2, t2 = execute(nb, path.parent)
    task, t3 = execute(with_task_lines(nb), path.parent)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for label, run in (("plain1", plain1), ("plain2", plain2), ("task", task)):
            nbformat.write(run, keep / f"{path.stem}.{label}.ipynb")
    report = compare_runs(path.parent.name, plain1, plain2, task)
    report.seconds = {"plain": round(t1, 1), "plain2": round(t2, 1), "task": round(t3, 1)}
    return report


# ------------------------------------------------------------------------------ main


def summary_table(reports: list[NotebookReport]) -> str:
    """One row per notebook and a total row."""
    head = (
        f"{'notebook':<26} {'cells':>5} {'identical':>9} {'differs':>7} {'unstable':>8}"
        "  seconds plain/plain/task"
    )
    rows = [head, "-" * len(head)]
    tot = [0, 0, 0, 0]
    for r in reports:
        counts = [
            len(r.cells),
            r.identical,
            sum(c.status == "differs" for c in r.cells),
            sum(c.status == "unstable" for c in r.cells),
        ]
        tot = [a + b for a, b in zip(tot, counts, strict=True)]
        s = r.seconds
        rows.append(
            f"{r.name:<26} {counts[0]:>5} {counts[1]:>9} {counts[2]:>7} {counts[3]:>8}  "
            f"{s.get('plain', 0):>5}/{s.get('plain2', 0)}/{s.get('task', 0)}"
        )
    rows.append("-" * len(head))
    rows.append(f"{'total':<26} {tot[0]:>5} {tot[1]:>9} {tot[2]:>7} {tot[3]:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook folders (default: all)")
    parser.add_argument("--diff", action="store_true", help="print each differing cell's diff")
    parser.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="write the executed copies here")
    args = parser.parse_args(argv)
    reports = []
    for name in args.names or all_notebooks():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        reports.append(check_notebook(name, keep=args.keep))
    print(summary_table(reports))
    for r in reports:
        for c in r.differing():
            first = c.source.splitlines()[0] if c.source else ""
            err = (
                f"  [%%task error: {c.task_error}]"
                if c.task_error and c.task_error != c.plain_error
                else ""
            )
            print(f"{r.name} cell {c.index} {c.status}: {first[:70]}{err}")
            if args.diff:
                print("\n".join("    " + line for line in c.diff.splitlines()))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{**asdict(r), "identical": r.identical} for r in reports], indent=1)
        )
    return 0 if all(not r.differing() for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
