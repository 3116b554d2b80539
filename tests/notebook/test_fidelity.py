"""``%%task --wait`` atop every cell of a notebook changes nothing a reader sees.

Each notebook under ``tests/notebooks/`` (pandas analysis, matplotlib and seaborn styles,
scikit-learn, scipy, text processing, a pure-Python simulation with a progress bar) runs
plainly twice and once with ``%load_ext nbtask`` and a ``%%task --wait`` line on every code
cell, through ``tests/notebooks/fidelity.py``. The test asserts that the two plain runs
agree and that every cell's normalised outputs (stdout, stderr, rich results, images by
pixels, errors by type) are identical, except cells whose metadata names a reason they
cannot be (listed in the README); on failure it prints each differing cell's diff.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "notebooks"))
import fidelity

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", fidelity.all_notebooks())
def test_task_wait_changes_nothing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernels (and so the workers) import the nbtask of this checkout.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))

    report = fidelity.check_notebook(name)

    unstable = [c for c in report.cells if c.status == "unstable"]
    assert not unstable, "the two plain runs disagree:\n\n" + report.format_failures()
    differing = report.differing()
    assert not differing, (
        f"{name}: {report.identical}/{len(report.cells)} code cells identical under "
        f"%%task --wait; the others:\n\n{report.format_failures()}"
    )
