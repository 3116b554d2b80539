"""Every event a task sends reaches its client, in the order sent, from whichever thread.

A task's events leave from two threads of its worker child: the outbox's own (output and
progress while the task runs) and the task's (what it left, then its final event). On
RabbitMQ each thread has a connection of its own, and RabbitMQ orders messages only
within one connection: the outbox's sends must be in the reply queue before the task's
thread sends anything after them, or the client sees a later event first and drops the
earlier one as old (and everything after the final event).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from worker_process import WorkerProcess

from nbtask import App

pytestmark = pytest.mark.brokers

PRINTS = "tests.sample_tasks.prints_to_the_end"
TASKS = 400


def test_every_line_a_task_prints_reaches_its_client_in_order(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    handles = [app.send_task(PRINTS, (tag, 1 + tag % 25)) for tag in range(TASKS)]
    assert [h.get(timeout=120) for h in handles] == list(range(TASKS))
    garbled = {
        tag: h.stdout
        for tag, h in enumerate(handles)
        if h.stdout != "".join(f"{tag}:{i}\n" for i in range(1 + tag % 25))
    }
    assert garbled == {}
