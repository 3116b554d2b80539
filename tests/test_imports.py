"""``import nbtask`` stays light: no notebook stack, no kombu, no side effects (DESIGN §3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

HEAVY = ("IPython", "ipywidgets", "ipykernel", "kombu")


def fresh(code: str) -> dict[str, object]:
    """Run ``code`` in a new interpreter; it prints one JSON object, returned here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize(
    "statement",
    [
        "import nbtask",
        "from nbtask import App, Settings, Task, TaskHandle",
        "import nbtask.cli",
        "import nbtask.worker",
    ],
)
def test_import_does_not_load_the_notebook_stack_or_kombu(statement: str) -> None:
    data = fresh(
        f"{statement}\nimport json, sys\n"
        f"print(json.dumps({{'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert data["loaded"] == []


def test_import_has_no_side_effects() -> None:
    data = fresh(
        "import threading, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import nbtask\n"
        "import json, sys\n"
        "print(json.dumps({'threads': threading.active_count(), "
        "'warnings': [str(w.message) for w in caught], "
        "'version': nbtask.__version__}))"
    )
    assert data["threads"] == 1  # no listener, no connection at import
    assert data["warnings"] == []
    assert data["version"]


def test_public_names_are_importable() -> None:
    data = fresh(
        "import json, nbtask\n"
        "missing = [n for n in nbtask.__all__ if not hasattr(nbtask, n)]\n"
        "print(json.dumps({'missing': missing}))"
    )
    assert data["missing"] == []


def test_errors_share_one_base() -> None:
    import nbtask
    from nbtask import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, nbtask.NbtaskError), name
