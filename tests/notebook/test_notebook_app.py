"""The notebook's own app around its ``%%task`` cells: public, with named cells; a
handler's output kept with its task; other versions on the workers named once; status,
elapsed time and interrupts as the notebook sees them; one embedded cluster per process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SECRET, wait_until
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State
from nbtask.notebook.session import Session


def test_notebook_app_is_public_and_named_cells_are_reachable(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "base = 10")
    task(ip, "scaled = base * 3", "clean --wait")
    assert nbtask.app() is nb.app
    assert nbtask.app().cells["clean"].delay(base=2).get(timeout=15)["scaled"] == 6


def test_handler_output_is_kept_with_its_task(
    ip: InteractiveShell, nb: Session, settings: Settings, tmp_path: Path
) -> None:
    run(
        ip,
        "from nbtask import app\nclass Audited(app().Task):\n    abstract = True\n"
        "    def on_success(self, retval, task_id, args, kwargs):\n"
        "        print('audited', retval)\n"
        "@app().task(base=Audited)\ndef double(x):\n    return 2 * x\nh = double.delay(21)",
    )
    handle = ip.user_ns["h"]
    assert handle.get(timeout=15) == 42
    wait_until(lambda: "audited 42" in nb.log(handle.id), 10, "the handler's output")
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    shown = subprocess.run(
        [sys.executable, "-m", "nbtask", "log", handle.id, "-b", settings.broker_url or "",
         "--key-prefix", settings.key_prefix, "--secret-file", str(secret)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "audited 42" in shown.stdout, shown.stderr


def test_another_version_on_the_workers_is_named_once(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy

    for worker_id in nb.app.workers():
        nb.app.store.announce_versions(
            worker_id, {"python": sys.version.split()[0], "numpy": "0.1"}
        )
    run(ip, "import numpy as np")
    task(ip, "m = float(np.mean([1, 2]))")
    task(ip, "n = float(np.mean([3, 4]))")
    err = capsys.readouterr().err
    assert err.count(f"numpy is {numpy.__version__} here but 0.1 on worker") == 1


def test_versions_and_worker_ids_from_the_registry_are_shown_without_control_codes(
    ip: InteractiveShell,
    nb: Session,
    access: RawBroker,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both are unsigned: anyone with broker access can announce a worker and its versions."""
    fake = "fake\x1b[5m-worker"
    real = next(iter(nb.app.workers().values()))
    access.store.hset(f"{settings.key_prefix}:workers", fake, real.to_json())
    access.store.set(f"{settings.key_prefix}:hb:{fake}", "1", ex=60)
    access.keys.announce_versions(fake, {"python": "\x1b]0;PWNED\x07\x1b[2J9.9"})
    nb.app.workers()  # cells go by the registry as last read (seconds ago): read it now
    task(ip, "x = 1")
    err = capsys.readouterr().err
    assert "python is" in err and "here but ?]0;PWNED??[2J9.9 on worker fake?[5m-worker" in err
    assert "\x1b" not in err and "\x07" not in err


def test_status_forgets_tasks_as_they_end(ip: InteractiveShell, nb: Session) -> None:
    task(ip, "import time\ntime.sleep(1)\nslept = 1", "--out h")
    handle = ip.user_ns["h"]
    wait_until(lambda: "busy 1" in nb.status(), 10, "the task to show as busy")
    handle.result(15)
    assert "busy 1" not in nb.status()  # at once, not at the worker's next heartbeat


def test_elapsed_time_is_the_tasks_own(ip: InteractiveShell, nb: Session) -> None:
    sent = time.time()
    task(ip, "import time\ntime.sleep(1.2)\ndone = 1", "--out h")
    handle = ip.user_ns["h"]
    handle.result(15)
    view = nb.views[handle.id]
    wait_until(lambda: view.state is State.SUCCESS, 5, "the view's final state")
    seen = time.time() - sent
    elapsed = view.elapsed()
    # The cell's own run (its 1.2 s sleep), within what the notebook saw, and it stops
    # counting once the task ended, however busy the machine is.
    assert 1.1 <= elapsed <= seen
    time.sleep(0.2)
    assert view.elapsed() == elapsed


@pytest.mark.parametrize("attempt", range(5))
def test_interrupt_while_waiting_always_cancels_under_load(
    ip: InteractiveShell, nb: Session, attempt: int
) -> None:
    import signal
    import threading

    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # both cores busy, as on a loaded machine
    try:
        task(ip, "import time\nprint('started')\ntime.sleep(30)\nlate = 1", "--out h")
        handle = ip.user_ns["h"]
        wait_until(lambda: "started" in handle.stdout, 20, "the cell to start")
        started = time.monotonic()
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            nb.pending.wait(["late"])
        assert time.monotonic() - started < 5
        wait_until(handle.done, 15, "the task to stop")
        assert handle.state is State.REVOKED
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def test_one_embedded_cluster_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    first, second = App("first"), App("second", secret=None)
    try:
        first.connect()
        second.connect()
        assert first.cluster is second.cluster is not None
        assert second.send_task("nbtask.no.such.task").exception(15) is not None
    finally:
        second.close()
        assert first.cluster is not None and first.cluster.process.poll() is None
        first.close()
