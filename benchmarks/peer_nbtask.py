"""nbtask as a ``compare.py`` harness, on Redis or on RabbitMQ (``--amqp URL``).

Starts ``python -m nbtask worker -b BROKER -c 2`` (random secret, unique key prefix; on
RabbitMQ ``NBTASK_RESULT_URL`` is the Redis given with ``--url``) the way
``bench_nbtask.py`` does, and drives it with ``bench_nbtask.NbtaskDriver``. Progress:
``nbtask.progress()`` in the task, seen by an ``on_event=`` callback (push). Notebook
cell: ``%load_ext nbtask`` with the same broker in the kernel's environment, then
``%%task --wait`` over ``x = 1``. With ``--embedded`` it also measures, after the worker
is stopped, one embedded-cluster cold start (``App()`` with no broker: a private Redis
and workers started from nothing) in a fresh process (``bench_nbtask.measure_cold``).
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import contextlib
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench_events import _Seen, _send
from bench_nbtask import NbtaskDriver, _start_worker, _stop, measure_cold
from common import delete_prefix
from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S, main, version_of

import nbtask

IMPORT_S = time.perf_counter() - _t


def report(n: int, gap: float, lead: float, tail: float) -> int:
    import time

    import nbtask

    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        nbtask.progress(i + 1, n, repr(time.time()))
    time.sleep(tail)
    return n


def delete_amqp_queues(amqp_url: str, prefix: str) -> int:
    """Delete the durable task queues declared under ``prefix`` (listed with rabbitmqctl).

    Reply queues are left alone: they are exclusive (another connection may not delete
    one still in use) and go with their connection.
    """
    import kombu

    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    names = [n for n in out.split() if n.startswith(prefix + ":q:")]
    if names:
        with kombu.Connection(amqp_url, connect_timeout=3) as conn:
            channel = conn.channel()
            for name in names:
                channel.queue_delete(name)
    return len(names)


class NbtaskPeer:
    def __init__(self, url: str, amqp: str | None, embedded: bool, idle_wait: float) -> None:
        self.redis_url = url
        self.amqp = amqp
        self.broker = amqp or url
        self.name = "nbtask-amqp" if amqp else "nbtask"
        self.prefix = f"nbbench-{uuid.uuid4().hex[:12]}"
        self.secret = secrets.token_hex(32)
        self.embedded = embedded
        self.idle_wait = idle_wait
        self.extra_env = {"NBTASK_RESULT_URL": url} if amqp else {}
        self.tmp = tempfile.TemporaryDirectory(prefix="nbbench-worker-")
        self.log_path = Path(self.tmp.name) / "worker.log"
        self.worker: subprocess.Popen[bytes] | None = None
        self.app: Any = None

    def start(self) -> None:
        self.worker = _start_worker(
            self.broker, self.secret, self.prefix, self.log_path, extra_env=self.extra_env
        )
        options = {"result_url": self.redis_url} if self.amqp else {}
        self.app = nbtask.App(
            "bench", broker=self.broker, secret=self.secret, key_prefix=self.prefix, **options
        )
        self.driver = NbtaskDriver(self.app, 120.0)
        self.report = self.app.task(report)

    def call_noop(self) -> None:
        self.driver.call_noop()

    def submit_noops_loop(self, n: int) -> list[Any]:
        return self.driver.submit_noops_loop(n)

    def submit_noops_batch(self, n: int) -> list[Any]:
        return self.driver.submit_noops_batch(n)

    def gather(self, handles: Any) -> None:
        self.driver.gather(handles)

    def call_total(self, a: Any) -> float:
        return self.driver.call_total(a)

    def worker_pids(self) -> list[int]:
        import psutil

        assert self.worker is not None
        supervisor = psutil.Process(self.worker.pid)
        # The worker children run the supervisor's executable; so does the short-lived
        # probe listing installed versions (still running on a busy machine): not a worker.
        pids = []
        for c in supervisor.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone meanwhile
                if c.exe() == supervisor.exe() and "nbtask.wire.versions" not in c.cmdline():
                    pids.append(c.pid)
        return pids

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        seen = _Seen()
        _send(self.report, (n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S), seen).get(timeout=120)
        out = [(int(e.data["done"]), float(e.data["message"]), t) for t, e in seen.of("progress")]
        return "push (on_event)", out

    def cell(self) -> tuple[dict[str, str], str, str]:
        env = {
            "NBTASK_BROKER": self.broker,
            "NBTASK_SECRET": self.secret,
            "NBTASK_KEY_PREFIX": self.prefix,
            **self.extra_env,
        }
        return env, "%load_ext nbtask", "%%task --wait\nx = 1"

    def versions(self) -> dict[str, str]:
        v = version_of("nbtask", "redis", "kombu", "cloudpickle")
        v["nbtask_path"] = str(Path(nbtask.__file__).resolve().parent.parent)
        return v

    def stop(self) -> None:
        if self.app is not None:
            self.app.close()
        if self.worker is not None:
            _stop(self.worker)
        delete_prefix(self.redis_url, self.prefix + ":")
        if self.amqp:
            with contextlib.suppress(Exception):
                delete_amqp_queues(self.amqp, self.prefix)
        self.tmp.cleanup()

    def after(self) -> dict[str, Any]:
        """The embedded cluster's cold start and idle memory, in a fresh process."""
        if not self.embedded:
            return {}
        return {"embedded": measure_cold(1, self.idle_wait)}


def _add(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--amqp", help="RabbitMQ broker URL; --url is then the result store")
    ap.add_argument("--embedded", action="store_true", help="also one embedded cold start")


def _make(args: argparse.Namespace) -> NbtaskPeer:
    return NbtaskPeer(args.url, args.amqp, args.embedded, 1.0 if args.quick else 2.0)


if __name__ == "__main__":
    sys.exit(main(_make, IMPORT_S, add_args=_add))
