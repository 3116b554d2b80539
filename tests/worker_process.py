"""A ``python -m nbtask worker`` subprocess a test started (``WorkerProcess``)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil

from nbtask import Settings
from nbtask.brokers import open_broker
from nbtask.errors import BrokerUnavailable
from nbtask.wire.records import WorkerInfo


def _is_versions_probe(process: psutil.Process) -> bool:
    try:
        return "nbtask.wire.versions" in process.cmdline()
    except psutil.Error:  # gone already
        return True


class WorkerProcess:
    """A ``python -m nbtask worker`` subprocess."""

    def __init__(self, process: subprocess.Popen[bytes], settings: Settings, log: Path) -> None:
        self.process = process
        self.settings = settings
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        """The worker's child processes, without the short-lived probe of its versions."""
        return [c for c in psutil.Process(self.pid).children() if not _is_versions_probe(c)]

    def entry(self) -> tuple[str, WorkerInfo]:
        """This worker's id and registry entry, read now whether or not its last heartbeat
        is still fresh (on a loaded machine a short heartbeat can lapse for a moment, and
        ``app.workers()`` then lists it not)."""
        broker = open_broker(self.settings, self.settings.broker_url or "")
        try:
            registered = {**broker.store.dead_workers(), **broker.store.workers()}
            [(worker_id, info)] = [
                (worker_id, info)
                for worker_id, info in registered.items()
                if info is not None and info.pid == self.pid
            ]
        finally:
            broker.close()
        return worker_id, info

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the registry names the worker and its children: a start is no speed target
        (a loaded machine, a slow shared Redis), so a read not answered in time is retried."""
        broker = open_broker(self.settings, self.settings.broker_url or "")
        deadline = time.monotonic() + timeout
        unanswered = ""
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"worker exited early:\n{self.log.read_text()}")
                try:
                    registered = broker.store.workers()
                except BrokerUnavailable as exc:  # slow, not gone: the deadline says when
                    registered, unanswered = {}, f" (the registry's last read: {exc})"
                live = [i for i in registered.values() if i.pid == self.pid]
                # Ready once the registry names the children that run: the worker starts
                # its versions probe (a child too, for a moment) before it says so.
                children = {c.pid for c in self.children()}
                if live and children and children == set(live[0].pids):
                    return
                time.sleep(0.05)
        finally:
            broker.close()
        raise AssertionError(
            f"worker not ready after {timeout} s{unanswered}:\n{self.log.read_text()}"
        )

    def stop(self) -> None:
        """Warm shutdown, as an operator's Ctrl-C: running tasks finish first."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.end()

    def stops_on_one_sigterm(self, timeout: float = 30.0) -> str:
        """Send one SIGTERM (a warm stop) and wait for a clean exit; return the log.

        Fails, showing the log, if the worker is still running after ``timeout``.
        """
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"one SIGTERM did not stop the worker:\n{self.log.read_text()}"
            ) from None
        log = self.log.read_text()
        assert self.process.returncode == 0, log
        return log

    def kill_whole(self) -> None:
        """SIGKILL the supervisor and its children at once: none of the worker cleans up.

        As a machine that dies does; other workers find it dead once its heartbeats lapse.
        """
        for process in [*self.children(), psutil.Process(self.pid)]:
            process.kill()

    def end(self) -> None:
        """Cold shutdown (a second signal): children are killed, their tasks settled.

        What a test's teardown needs: no waiting for idle children to notice a warm stop.
        """
        while self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
        if self.process.returncode is None:  # pragma: no cover - wait() sets it
            self.process.kill()
            self.process.wait()
