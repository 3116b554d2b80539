"""The index of the tasks a client sent (for a notebook re-attaching after a restart).

Each send notes its task there; trimming it and pushing back its expiry is done by a
send once a second per client, so the index is kept a little longer than its tasks.
"""

from __future__ import annotations

from raw_broker import RawBroker

from nbtask import App

ADD = "tests.sample_tasks.add"


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
