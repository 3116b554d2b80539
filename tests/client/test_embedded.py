"""The embedded local cluster: started by ``App()`` with no broker, gone when its client is;
and ``python -m nbtask cluster`` in the foreground."""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import redis
from helpers import ROOT, exited, processes_mentioning, wait_until

from nbtask import App, Settings
from nbtask.client import embedded


def clean_env() -> dict[str, str]:
    """The environment without any NBTASK_* variable, so ``App()`` embeds a cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Lines:
    """Collects a subprocess's stdout lines on a thread, for reads with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self._q.put(raw.decode(errors="replace"))
        self._q.put("")

    def until(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                break
            if not line:
                raise AssertionError(
                    f"process ended (code {self.proc.wait()}) before printing {pattern!r}; "
                    f"output so far:\n{''.join(self.seen)}"
                )
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{''.join(self.seen)}")


CLIENT_SCRIPT = r"""
import sys, time
from nbtask import App, Settings

app = App("embedded-test")

@app.task
def triple(x):
    return 3 * x

print("RESULT", triple.delay(14).get(timeout=30), flush=True)
print("DIR", app.cluster.directory, flush=True)

@app.task
def shell(command):
    import os, subprocess
    return os.system(command), subprocess.run(command, shell=True).returncode

# A task's child processes write to the worker's stdout: never a closed pipe.
print("SHELL", *shell.delay("echo from-a-task").get(timeout=30), flush=True)
import numpy as np
big = np.ones(1_000_000)  # 8 MB: its buffer travels out of band, as a blob
tripled = triple.delay(big).get(timeout=30)
tripled[0] = 0.0  # mapped copy-on-write: writable
blobs = app.store.local_blobs.directory
deadline = time.monotonic() + 10  # the argument's file goes once the task has ended
while len(list(blobs.iterdir())) > 1 and time.monotonic() < deadline:
    time.sleep(0.05)
in_redis = list(app.store.link.redis.scan_iter(match="*:blob:*"))
print("BLOBS", blobs, len(list(blobs.iterdir())), len(in_redis), tripled.sum(), flush=True)
print("PID", app.cluster.process.pid, flush=True)
if sys.argv[1] == "hang":
    print("HANGING", flush=True)
    time.sleep(600)
"""


def _run_client(mode: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        cwd=tmp_path,
    )
    return proc, Lines(proc)


def _assert_cluster_gone(directory: str, timeout: float) -> None:
    wait_until(
        lambda: not processes_mentioning(directory) and not os.path.exists(directory),
        timeout,
        f"the cluster in {directory} to go away",
    )


def test_embedded_cluster_round_trip_and_cleanup_on_exit(tmp_path: Path) -> None:
    proc, out = _run_client("exit", tmp_path)
    try:
        assert out.until(r"^RESULT (\S+)").group(1) == "42"
        directory = out.until(r"^DIR (\S+)").group(1)
        assert out.until(r"^SHELL (\S+) (\S+)").groups() == ("0", "0")
        # Argument and result went through shared memory, none through the private Redis.
        blobs, files, in_redis, total = out.until(r"^BLOBS (\S+) (\d+) (\d+) (\S+)").groups()
        # One file, the result's: the argument's went when the task ended.
        assert blobs.startswith("/dev/shm/") and (int(files), int(in_redis)) == (1, 0)
        assert float(total) == 3 * 1_000_000 - 3
        cluster_pid = int(out.until(r"^PID (\d+)").group(1))
        assert proc.wait(30) == 0, "".join(out.seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.basename(directory).startswith("nbtask-")
    # The client waited for the cluster on exit: nothing of it may remain.
    _assert_cluster_gone(directory, timeout=5)
    _assert_cluster_gone(blobs, timeout=5)
    assert not psutil.pid_exists(cluster_pid) or (
        psutil.Process(cluster_pid).status() == psutil.STATUS_ZOMBIE
    )


def test_embedded_cluster_cleans_up_after_client_is_killed(tmp_path: Path) -> None:
    proc, out = _run_client("hang", tmp_path)
    try:
        assert out.until(r"^RESULT (\S+)").group(1) == "42"
        directory = out.until(r"^DIR (\S+)").group(1)
        blobs = out.until(r"^BLOBS (\S+)").group(1)
        out.until(r"^HANGING")
        alive = processes_mentioning(directory)
        # The cluster (supervisor) and its redis-server at least.
        assert any("redis-server" in p for p in alive), alive
        assert any("nbtask" in p and "cluster" in p for p in alive), alive
        assert os.path.isdir(directory)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _assert_cluster_gone(directory, timeout=10)
    _assert_cluster_gone(blobs, timeout=10)


def test_foreground_cluster_command(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "cluster", "-c", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=tmp_path,
    )
    out = Lines(proc)
    try:
        url = out.until(r"export NBTASK_BROKER=(\S+)").group(1)
        secret = out.until(r"export NBTASK_SECRET=(\S+)").group(1)
        assert url.startswith("unix://")
        socket_path = url[len("unix://") :]
        directory = os.path.dirname(socket_path)
        servers = [c for c in psutil.Process(proc.pid).children() if "redis-server" in c.name()]
        assert len(servers) == 1, psutil.Process(proc.pid).children()
        server = servers[0]
        redis.Redis(unix_socket_path=socket_path).ping()

        # The printed exports are enough for a client to use the cluster.
        with App("fg", broker=url, secret=secret) as client:

            @client.task
            def negate(x: int) -> int:
                return -x

            assert negate.delay(5).get(timeout=20) == -5

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, "".join(out.seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(
        lambda: exited(server.pid),
        10,
        "the cluster's redis-server to stop",
    )
    assert not processes_mentioning(directory)
    assert not os.path.exists(directory)


def test_foreground_cluster_prints_every_setting_a_client_needs(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    env = {
        **clean_env(),
        "NBTASK_KEY_PREFIX": "hunt-x",
        "NBTASK_DEFAULT_QUEUE": "hunt-q",
        "NBTASK_BLOB_DIR": str(blobs),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "cluster", "-c", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    out = Lines(proc)
    try:
        out.until(r"^Connect a client with:")
        exports: dict[str, str] = {}
        while line := out.until(r"^(\s*export .*|\s*)$").group(1).strip():
            name, _, value = shlex.split(line)[1].partition("=")
            exports[name] = value
        assert exports["NBTASK_KEY_PREFIX"] == "hunt-x"
        assert exports["NBTASK_DEFAULT_QUEUE"] == "hunt-q"
        assert exports["NBTASK_BLOB_DIR"] == str(blobs)

        # Those lines alone (the client's environment has no other NBTASK_* variable) are
        # enough: its tasks reach the workers, and a value they leave as a blob comes back.
        with App("fg", settings=Settings.from_env(exports)) as client:

            @client.task
            def negate(x: Any) -> Any:
                return -x

            assert negate.delay(5).get(timeout=20) == -5
            big = np.ones(1_000_000)  # 8 MB: out of band, through the blob directory
            assert negate.delay(big).get(timeout=30).sum() == -1_000_000

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, "".join(out.seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_foreground_cluster_runs_as_many_processes_as_nbtask_workers_says(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "cluster"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**clean_env(), "NBTASK_WORKERS": "3"},
        cwd=tmp_path,
    )
    out = Lines(proc)
    try:
        assert out.until(r"^\s*concurrency:\s*(\d+) child processes").group(1) == "3"
        out.until(r"^Connect a client with:")
        exports: dict[str, str] = {}
        while line := out.until(r"^(\s*export .*|\s*)$").group(1).strip():
            name, _, value = shlex.split(line)[1].partition("=")
            exports[name] = value
        with App("fg", settings=Settings.from_env(exports)) as client:  # serving: stop it then

            @client.task
            def double(x: int) -> int:
                return 2 * x

            assert double.delay(4).get(timeout=20) == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, "".join(out.seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NBTASK_"):
            monkeypatch.delenv(name)


#: A notebook whose folder holds modules named like standard ones: the kernel imported
#: its own first (here: nbtask, before moving there), as a kernel started elsewhere has.
SHADOWED_SCRIPT = r"""
import os, sys
import nbtask
os.chdir(sys.argv[1])
sys.path.insert(0, "")
app = nbtask.App("shadowed")
task = app.task(lambda x: x + 1, name="plus")
print("RESULT", task.delay(41).get(timeout=60), flush=True)
app.close()
"""


def test_modules_beside_the_notebook_named_like_standard_ones_do_not_stop_the_cluster(
    tmp_path: Path,
) -> None:
    """``secrets.py`` or ``queue.py`` beside a notebook: the embedded cluster started in
    that folder imports the standard modules, as the kernel did."""
    folder = tmp_path / "notebook"
    folder.mkdir()
    (folder / "secrets.py").write_text("API_KEY = 'abc'\n")
    (folder / "queue.py").write_text("JOBS = []\n")
    done = subprocess.run(
        [sys.executable, "-c", SHADOWED_SCRIPT, str(folder)],
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert "RESULT 42" in done.stdout, done.stdout + done.stderr[-3000:]


def test_the_cluster_starts_where_nbtask_is_found_only_in_the_notebooks_folder(
    tmp_path: Path,
) -> None:
    """A checkout of nbtask beside the notebook, not installed: imported from there."""
    folder = tmp_path / "notebook"
    shutil.copytree(ROOT / "nbtask", folder / "nbtask")
    site = sysconfig.get_paths()["purelib"]  # its libraries, without the installed nbtask
    done = subprocess.run(
        [sys.executable, "-S", "-c", embedded._LAUNCH, "cluster", "--help"],
        check=False,
        capture_output=True,
        text=True,
        env={**clean_env(), "PYTHONPATH": os.pathsep.join([site, str(folder)])},
        cwd=folder,
        timeout=60,
    )
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]
