"""A RabbitMQ node of the test's own, to stop and start again at will.

The shared RabbitMQ (127.0.0.1:5672) serves other tests and people: it is never stopped.
A :class:`PrivateRabbitMQ` is a separate node (own name, ports, Erlang cookie, epmd, data
and log directories, no plugins) that keeps its data directory across :meth:`restart`, so
durable queues and persistent messages survive as they would on a production server.

The scripts under ``/usr/lib/rabbitmq/bin`` are run directly: Debian's ``/usr/sbin``
wrappers switch a root caller to the ``rabbitmq`` user, whose home holds the shared
node's cookie, not this one's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
EPMD = "/usr/bin/epmd"
#: What a missing server says: the fixture fails (never skips) with this.
MISSING = (
    "rabbitmq-server is not installed ({path} is missing): the RabbitMQ restart tests start "
    "a RabbitMQ node of their own. Install it with: apt-get install -y rabbitmq-server"
)
_START_SECONDS = 90.0  # a loaded 2-core machine boots RabbitMQ in 5-30 s
_STOP_SECONDS = 60.0


def missing() -> str | None:
    """Why a private node cannot start here (what to install), or None."""
    for path in (RABBITMQ_BIN / "rabbitmq-server", RABBITMQ_BIN / "rabbitmqctl", Path(EPMD)):
        if not os.access(path, os.X_OK):
            return MISSING.format(path=path)
    return None


class PrivateRabbitMQ:
    """A RabbitMQ node under ``directory``, listening on 127.0.0.1 only.

    Its AMQP port, distribution port and epmd port are free ports chosen once, so the
    node comes back at the same address after :meth:`restart`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"nbtest-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self._prepare()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    def _prepare(self) -> None:
        home = self.directory / "home"
        for sub in ("home", "mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        # Erlang refuses a cookie others can read.
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        # Not /etc/rabbitmq's files: they name the shared node and its port 5672.
        (self.directory / "rabbitmq-env.conf").write_text("")
        (self.directory / "rabbitmq.conf").write_text("log.file.level = info\n")
        (self.directory / "enabled_plugins").write_text("[].\n")  # no management: no 15672

    def env(self) -> dict[str, str]:
        """The environment of the node and of ``rabbitmqctl`` talking to it."""
        d = self.directory
        return dict(
            os.environ,
            HOME=str(d / "home"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
        )

    def start(self) -> None:
        """Start the node (its own epmd first) and wait until it takes AMQP connections."""
        # A node ended a moment ago (by a signal) may hold its port until it is gone.
        deadline = time.monotonic() + _STOP_SECONDS
        while self._accepts(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"port {self.port} still taken: the last node did not end")
            time.sleep(0.05)
        if self.epmd is None:
            self.epmd = subprocess.Popen(
                [EPMD, "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._wait_for(self.epmd_port, self.epmd, "epmd")
        with (self.directory / "server.out").open("ab") as out:
            self.server = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env(),
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a stuck node is killed whole
            )
        self._wait_for(self.port, self.server, "the private RabbitMQ node")
        # The listener opens late in the boot; this says the boot is over.
        self.ctl("await_startup", "--timeout", str(int(_START_SECONDS)))

    def _accepts(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _wait_for(self, port: int, process: subprocess.Popen[bytes], what: str) -> None:
        """Until ``port`` takes connections; fails, showing the logs, if ``process`` exits."""
        deadline = time.monotonic() + _START_SECONDS
        while not self._accepts(port):
            if process.poll() is not None:
                raise AssertionError(f"{what} exited ({process.returncode}):\n{self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start:\n{self._tail()}")
            time.sleep(0.1)

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` on this node; its output (fails, showing it, on an error)."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=_STOP_SECONDS + 30,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def stop(self) -> None:
        """Stop the node as an operator would (``rabbitmqctl stop``); kill it if that fails."""
        server, self.server = self.server, None
        if server is None:
            return
        try:
            if server.poll() is None:
                self.ctl("stop")
            server.wait(_STOP_SECONDS)
        except (AssertionError, subprocess.TimeoutExpired):
            server.terminate()  # the script stops the node as on SIGTERM
            try:
                server.wait(_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)

    def running(self) -> None:
        """Start the node unless it runs (a test that failed may have left it stopped)."""
        if self.server is None or self.server.poll() is not None:
            self.server = None
            self.start()

    def restart(self) -> None:
        """Stop the node and start it again on the same data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and its epmd; delete its directories."""
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def queues(self) -> dict[str, int]:
        """Every queue of the node and the messages it holds (ready and unacknowledged)."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages")
        listed = (line.rsplit(None, 1) for line in out.splitlines() if line.strip())
        return {name: int(count) for name, count in listed}

    def _tail(self) -> str:
        parts = []
        for path in (self.directory / "server.out", self.log):
            if path.exists():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts) or "(no output)"
