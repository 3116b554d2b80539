"""A task named by a unique prefix of its id (what views show), as git and Docker take one.

``app.handle`` in another process (a restarted kernel) finds the task whose kept record's
id begins with the prefix; none or several is one clear ``TaskNotFound``; ``app.revoke``
takes the same prefixes. Real Redis (and RabbitMQ for revoke).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App, Settings, State, TaskNotFound, TaskRevoked


def test_handle_takes_a_unique_prefix_of_an_id(
    app: App, settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    sent = app.send_task("tests.sample_tasks.add", (2, 3))
    assert sent.get(timeout=15) == 5
    with App("restarted", settings=settings) as later:  # knows no task of its own
        handle = later.handle(sent.id[:8])
        assert handle.id == sent.id
        assert handle.get(timeout=15) == 5
        assert later.AsyncResult(sent.id[:12]).id == sent.id


def test_a_prefix_of_several_ids_or_none_or_too_short_is_task_not_found(
    app: App, settings: Settings
) -> None:
    for task_id in ("feedface0a", "feedface0b"):
        app.send_task("tests.sample_tasks.add", (2, 3), task_id=task_id)  # no worker: pending
    with App("restarted", settings=settings) as later:
        with pytest.raises(TaskNotFound, match=r"several tasks \(feedface0a, feedface0b\)"):
            later.handle("feedface")
        with pytest.raises(TaskNotFound, match="nor one whose id begins with it"):
            later.handle("feedface0c")
        with pytest.raises(TaskNotFound, match=r"^no task 'feed' in the result store: "):
            later.handle("feed")  # fewer than 8 characters name no task but their own
        whole = "0" * 32  # a whole id as nbtask makes them: not a prefix either
        with pytest.raises(TaskNotFound, match=rf"^no task '{whole}' in the result store: "):
            later.handle(whole)
        assert later.handle("feedface0a").id == "feedface0a"
        assert later.handle("feedface0b").id == "feedface0b"


def test_a_key_prefix_with_glob_characters_matches_only_its_own_records(
    settings: Settings, prefix: str
) -> None:
    # Under the test's prefix, so that its keys go with the test's.
    starred = settings.replace(key_prefix=f"{prefix}:*")
    with App("other", settings=settings.replace(key_prefix=f"{prefix}:x")) as other:
        sent = other.send_task("tests.sample_tasks.add", (2, 3))
    # "<prefix>:*" read as a pattern would match the records of "<prefix>:x" too.
    starred_app = App("starred", settings=starred)
    with starred_app, pytest.raises(TaskNotFound, match="nor one whose id begins with it"):
        starred_app.handle(sent.id[:8])
    with App("other", settings=settings.replace(key_prefix=f"{prefix}:x")) as later:
        assert later.handle(sent.id[:8]).id == sent.id


@pytest.mark.brokers
def test_revoke_takes_a_unique_prefix_of_an_id_as_handle_does(app: App, settings: Settings) -> None:
    queued = app.send_task("tests.sample_tasks.add", (2, 3))  # no worker: it waits
    twins = [app.send_task("tests.sample_tasks.add", (2, 3), task_id=f"beadbead{c}") for c in "ab"]
    with App("restarted", settings=settings) as later:  # knows no task of its own
        assert later.revoke(queued.id[:8]) is True
        with pytest.raises(TaskRevoked):
            queued.get(timeout=15)
        with pytest.raises(TaskNotFound, match=r"several tasks \(beadbeada, beadbeadb\)"):
            later.revoke("beadbead")
        # An id that names no task and begins none is revoked ahead, as Celery does:
        # a task sent with it later never starts.
        assert later.control.revoke(["beadbeadc"]) is True
        assert later.handle("beadbeadc").state is State.REVOKED
        assert [later.handle(t.id).state for t in twins] == [State.PENDING, State.PENDING]
        assert later.control.revoke([twins[0].id]) is True
        with pytest.raises(TaskRevoked):
            twins[0].get(timeout=15)
        # A whole id without a record is still revoked ahead (a chain's step not sent yet).
        ahead = uuid.uuid4().hex
        assert later.revoke(ahead) is True
        assert later.handle(ahead).state is State.REVOKED
    assert twins[1].state is State.PENDING


@pytest.mark.brokers
def test_an_own_id_revoked_ahead_is_never_taken_for_the_start_of_another(
    app: App, settings: Settings, access: RawBroker
) -> None:
    # A user's own ids are not prefixes: "report-1" revoked ahead is that very task, not
    # "report-10" waiting in the queue, nor a record someone planted to draw the revoke.
    waiting = app.send_task("tests.sample_tasks.add", (2, 3), task_id="report-10")
    access.store.hset(access.keys.record_key("nightly-run-x"), "state", "PENDING")
    with App("restarted", settings=settings) as later:
        assert later.revoke("report-1") is True
        assert later.revoke("nightly-run") is True
        assert later.handle("report-1").state is State.REVOKED
        assert later.handle("nightly-run").state is State.REVOKED
        assert later.handle("report-10").state is State.PENDING
        assert access.record("nightly-run-x").get(b"state") == b"PENDING"
    assert waiting.state is State.PENDING
