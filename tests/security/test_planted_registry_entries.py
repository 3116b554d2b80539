"""Garbage planted in the worker registry does not make a client end a live task.

A client ends a task as lost when its record and message are gone and no live worker's
registry entry names it (see :mod:`nbtask.client.lost`). Anyone who can write to Redis can
delete a record and a message; an entry nbtask cannot read (garbage put where a live
worker's entry is) says nothing of what that worker runs, so the client takes no task for
lost while it is there. The registry is not signed: an entry forged to be readable is
taken at its word (the README's security section says what that allows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
from helpers import wait_until

from nbtask import App
from nbtask.errors import ConfigurationError

pytestmark = pytest.mark.brokers("redis")

WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def _said(words: str, caplog: pytest.LogCaptureFixture) -> bool:
    return any(words in record.getMessage() for record in caplog.records)


def test_a_garbage_entry_of_a_live_worker_does_not_make_its_running_task_lost(
    app: App,
    r: redis.Redis,
    prefix: str,
    start_worker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    marker, go = tmp_path / "marker", tmp_path / "go"
    start_worker(concurrency=1)
    handle = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 120.0))
    app.flush()  # its publish answered for: not a send in doubt
    wait_until(marker.exists, 30, "the task to start")
    wait_until(lambda: handle.state == "STARTED", 30, "the client to see it start")
    (worker_id,) = r.hkeys(f"{prefix}:workers")

    # The outsider keeps garbage where the live worker's entry is (its heartbeats write
    # it back), and deletes the task's record and message.
    stop = threading.Event()

    def plant() -> None:
        while not stop.wait(0.01):
            r.hset(f"{prefix}:workers", worker_id, b"\xff not json")

    planter = threading.Thread(target=plant, daemon=True)
    planter.start()
    try:
        r.delete(f"{prefix}:r:{handle.id}")
        queue = f"{prefix}:q:default"
        for entry_id, fields in r.xrange(queue):
            if fields.get(b"i") == handle.id.encode():
                r.xdel(queue, entry_id)
        # And makes the client's channel unreadable for a moment: an outage, after which
        # the client looks for tasks the broker lost.
        waiter: dict[str, object] = {}
        reader = threading.Thread(target=lambda: waiter.update(result=_get(handle)), daemon=True)
        reader.start()
        # A look that read the genuine entry (a heartbeat wrote it back just before)
        # rightly finds the task running and looks no more: a new outage, a new look.
        for outage in range(1, 6):
            r.set(app.channel, b"not a stream")
            wait_until(lambda n=outage: _read_errors(caplog) >= n, 30, "a read error")
            r.delete(app.channel)
            with contextlib.suppress(AssertionError):
                wait_until(
                    lambda: handle.done() or _said("cannot be read", caplog),
                    30,
                    "the client to look at the missing record twice",
                )
                break
        assert _said("cannot be read", caplog), "no look read the garbage entry"
        assert not handle.done(), handle.error  # (before: TaskNotFound, "was lost")
    finally:
        stop.set()
        planter.join(10)
    go.touch()
    reader.join(60)
    assert isinstance(waiter.get("result"), int), waiter


def _read_errors(caplog: pytest.LogCaptureFixture) -> int:
    return sum("error reading the event channel" in r.getMessage() for r in caplog.records)


def _get(handle) -> object:
    try:
        return handle.get(timeout=90)
    except Exception as exc:  # the test looks at what it raised
        return exc


def test_a_forged_entry_of_a_worker_with_another_secret_is_said_to_be_maybe_forged(
    app: App, r: redis.Redis, prefix: str, start_worker
) -> None:
    """One readable entry serving ``default`` under a made-up secret id refuses sends (a
    worker with another secret would lose them): the error says it may be forged, and the
    id it names (anyone's text) is shown without its control codes and cut short."""
    start_worker(concurrency=1)
    wait_until(lambda: r.hlen(f"{prefix}:workers") == 1, 30, "the worker to register")
    (genuine,) = r.hvals(f"{prefix}:workers")
    forged_id = "evil\x1b[2J" + "x" * 200
    fields = json.loads(genuine)
    fields.update(hostname="evil", pid=4242, pids=[4243], keys=["0000000000000000"])
    fields.update(queues=["default"], seen=time.time(), consumers=["evil-c-0"])
    r.hset(f"{prefix}:workers", forged_id, json.dumps(fields))
    r.set(f"{prefix}:hb:{forged_id}", json.dumps(fields), ex=60)
    with pytest.raises(ConfigurationError) as raised:
        app.send_task("tests.sample_tasks.add", (1, 1))
    said = str(raised.value)
    # Before, it told the user to change their secret, and nothing else.
    assert said.endswith("someone wrote these registry entries: the registry is not signed")
    assert "\x1b" not in said and "x" * 61 not in said, said
