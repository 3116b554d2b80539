"""The index of the tasks a client sent (for a notebook re-attaching after a restart).

Each send notes its task there; trimming it and pushing back its expiry is done by a
send once a second per client, so the index is kept a little longer than its tasks.
"""

from __future__ import annotations

import pytest
from raw_broker import RawBroker

from nbtask import App
from nbtask.brokers.scripts import INDEX_UPKEEP_SECONDS

ADD = "tests.sample_tasks.add"

pytestmark = pytest.mark.brokers


def test_the_index_names_every_task_sent_and_outlives_the_newest(
    app: App, access: RawBroker
) -> None:
    handles = [app.send_task(ADD, (i, 1)) for i in range(5)]  # no worker: they stay queued
    app.flush()
    index = app.store.client_tasks_key(app.channel)
    assert set(access.store.zrange(index, 0, -1)) == {h.id.encode() for h in handles}
    newest = app.store.record_key(handles[-1].id)
    assert access.store.ttl(index) >= access.store.ttl(newest) > 0
    sent = app.store.recent_tasks("notebook", app.channel, 10)
    assert {task_id for task_id, _, _ in sent} == {h.id for h in handles}


def test_a_send_within_a_second_of_the_last_trim_leaves_the_index_alone(
    app: App, access: RawBroker
) -> None:
    """A loop of sends trims the index and pushes back its expiry once a second, not on
    every send (two commands less per task, on either broker)."""
    first = app.send_task(ADD, (1, 1))  # trims: the first send to this index
    app.flush()
    index = app.store.client_tasks_key(app.channel)
    assert access.store.ttl(index) > INDEX_UPKEEP_SECONDS
    access.store.expire(index, 10_000_000)  # marked: a trim would set it back
    second = app.send_task(ADD, (2, 1))  # well within a second of the first
    app.flush()
    assert set(access.store.zrange(index, 0, -1)) == {first.id.encode(), second.id.encode()}
    assert access.store.ttl(index) > 9_000_000
