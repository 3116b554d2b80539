"""A worker serving several queues on Redis takes from the first it names first: the
README's advice for urgent work, in place of Celery's ``priority`` (refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RECORD_ID, wait_until

from nbtask import App

pytestmark = pytest.mark.brokers("redis")

WAIT = "tests.sample_tasks.wait_for_file"


def test_a_worker_takes_from_the_first_queue_it_names_first(
    app: App, start_worker, tmp_path: Path
) -> None:
    busy_marker, go, order = tmp_path / "busy", tmp_path / "go", tmp_path / "order"
    start_worker("-Q", "urgent,default", concurrency=1)
    busy = app.send_task(WAIT, (str(busy_marker), str(go)), queue="default")
    wait_until(busy_marker.exists, 30, "the worker's only process to be busy")
    # Queued while the process is busy: the ordinary work first, then the urgent.
    ordinary = [app.send_task(RECORD_ID, (str(order),), queue="default") for _ in range(3)]
    urgent = [app.send_task(RECORD_ID, (str(order),), queue="urgent") for _ in range(3)]
    # All six queued (the broker answered for each) before the process is free: a send
    # does not wait for that, and a loaded broker may take the urgent ones after it looked.
    app.flush()
    go.touch()
    for handle in [busy, *ordinary, *urgent]:
        handle.get(timeout=30)
    assert order.read_text().split() == [h.id for h in urgent] + [h.id for h in ordinary]
