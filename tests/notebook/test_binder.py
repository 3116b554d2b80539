"""binder/ builds a working environment, as far as this machine can do what Binder does.

Binder (repo2docker) copies the repository in and runs ``pip install -r
binder/requirements.txt`` from its root. Here: a fresh venv, the same pip command from the
repository root (nbtask is installed from this checkout, not editable), then the quickstart
run with that venv's ``nbtask run`` from outside the checkout. Slow (a full install): one test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from helpers import ROOT

BINDER = ROOT / "binder"


@pytest.mark.timeout(600)
def test_binder_environment_runs_the_quickstart(tmp_path: Path) -> None:
    requirements = BINDER / "requirements.txt"
    lines = [ln.strip() for ln in requirements.read_text().splitlines()]
    assert "." in lines, "Binder must install nbtask from the repository"
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-3."), runtime

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NBTASK_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    # nbtask comes from the venv (a real install), not from the checkout.
    where = subprocess.run(
        [str(python), "-c", "import nbtask; print(nbtask.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout

    # JupyterLab has the widget manager extension, prebuilt, enabled.
    extensions = subprocess.run(
        [str(env_dir / "bin" / "jupyter"), "labextension", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    listing = extensions.stdout + extensions.stderr
    assert "@jupyter-widgets/jupyterlab-manager" in listing and "enabled" in listing, listing

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", work)
    run = subprocess.run(
        [str(env_dir / "bin" / "nbtask"), "run", "quickstart.ipynb", "-o", "executed.ipynb"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "total = 22499775000500000" in run.stdout, run.stdout
    assert "long_task is REVOKED" in run.stdout, run.stdout
    assert (work / "executed.ipynb").exists()
