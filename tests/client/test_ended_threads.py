"""Threads that send tasks and end (a thread pool's, made again for each batch) leave no
connection to the broker behind, and nothing they sent is lost."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil
import pytest
from worker_process import WorkerProcess

from nbtask import App, TaskHandle

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
THREADS = 20
PORTS = {"redis": 6379, "amqp": 5672}


def _connections_to(port: int) -> int:
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _burst(app: App, n: int) -> list[TaskHandle]:
    """``n`` threads that each send one task and end."""
    handles: list[TaskHandle] = []
    threads = [
        threading.Thread(target=lambda i=i: handles.append(app.send_task(ADD, (i, 1))))
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return handles


def test_threads_that_sent_tasks_and_ended_leave_no_connection_open(
    app: App, start_worker: Callable[..., WorkerProcess], broker_kind: str
) -> None:
    start_worker()
    port = PORTS[broker_kind]
    first = _burst(app, THREADS)
    assert sorted(h.get(timeout=30) for h in first) == list(range(1, THREADS + 1))
    # A thread that ended keeps its connection until the next new thread connects: one
    # more thread after each burst leaves only its own.
    assert _burst(app, 1)[0].get(timeout=30) == 1
    before = _connections_to(port)
    later = [h for _ in range(4) for h in _burst(app, THREADS)]
    assert _burst(app, 1)[0].get(timeout=30) == 1
    assert sorted(h.get(timeout=30) for h in later) == sorted(list(range(1, THREADS + 1)) * 4)
    assert _connections_to(port) <= before + 1
