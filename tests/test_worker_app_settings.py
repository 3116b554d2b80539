"""``nbtask worker -A module``: the broker of the App the module defines, as Celery's ``-A``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from worker_process import WorkerProcess

from nbtask import App, Settings

pytestmark = pytest.mark.brokers("redis")


def _worker(settings: Settings, log: Path, env_broker: str | None) -> WorkerProcess:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    env.pop("NBTASK_BROKER", None)
    env["NBTASK_TEST_APP_BROKER"] = settings.broker_url or ""
    if env_broker is not None:
        env["NBTASK_BROKER"] = env_broker
    command = [sys.executable, "-m", "nbtask", "worker", "-c", "1", "-A", "tests.broker_app"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return WorkerProcess(process, settings, log)


@pytest.mark.parametrize("env_broker", [None, "redis://127.0.0.1:1/0"])
def test_a_worker_serves_the_broker_of_the_app_its_a_option_imports(
    app: App, settings: Settings, tmp_path: Path, env_broker: str | None
) -> None:
    # No -b: the App's broker= is served, also over a different NBTASK_BROKER (the App
    # sends to its own broker= whatever NBTASK_BROKER says), with one line saying so.
    worker = _worker(settings, tmp_path / "worker.log", env_broker)
    try:
        worker.wait_ready()
        assert app.send_task("tests.broker_app.add", (2, 3)).get(timeout=15) == 5
    finally:
        worker.end()
    log = worker.log.read_text()
    if env_broker is not None:
        assert f"not NBTASK_BROKER={env_broker}" in log
        assert "the -A App 'broker_app'" in log
    else:
        assert "not NBTASK_BROKER" not in log


def test_the_worker_help_says_which_broker_wins() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nbtask", "worker", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    text = " ".join(out.split())
    assert "the -A module's App(broker=...), else $NBTASK_BROKER" in text
    assert "-b and the other options win over the App's settings" in text
