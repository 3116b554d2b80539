"""Someone with write access to the broker and store, but not the secret, on the data path.

The worker registry, what each process holds, the blobs of large values and a client's
event channel are all kept in the store where anyone with broker access can write. These
tests forge or alter them directly, as such an outsider could, and check that clients,
``status`` and workers refuse what nbtask did not write with one clear error (or leave it
out, or replace it), never crash on it, and lose no task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import RECORD_ID, ledger_runs, wait_until
from raw_broker import RawBroker

from nbtask import App
from nbtask.core.holding import holder_queue
from nbtask.errors import BlobError
from nbtask.wire.blobs import digest_of
from nbtask.wire.holdings import holdings_lines

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
SLOW_EARLY = "tests.sample_tasks.slow_early"
ARRAY_BYTES = 6 * 1024 * 1024  # over the default 4 MiB blob threshold


def _entry(**changes: Any) -> dict[str, Any]:
    """A worker registry entry as a worker writes it (one live process)."""
    entry: dict[str, Any] = {
        "hostname": "elsewhere",
        "pid": 4242,
        "queues": ["default"],
        "concurrency": 1,
        "consumers": ["forged-0"],
        "started": time.time(),
        "seen": time.time(),
        "pids": [4243],
        "running": [""],
    }
    entry.update(changes)
    return entry


def _forge_worker(access: RawBroker, worker_id: str, raw: str | bytes, *, alive: bool) -> None:
    prefix = access.settings.key_prefix
    access.store.hset(f"{prefix}:workers", worker_id, raw)
    if alive:
        access.store.set(f"{prefix}:hb:{worker_id}", raw, px=60_000)


# The worker registry ---------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["started", "seen"])
def test_a_registry_entry_with_a_number_too_large_for_a_float_is_left_out(
    app: App, start_worker, access: RawBroker, field: str
) -> None:
    """JSON integers have no bound; ``float()`` of one past 1e308 raises OverflowError."""
    huge = json.dumps(_entry(**{field: 10**400}))
    _forge_worker(access, "forged-live", huge, alive=True)
    _forge_worker(access, "forged-dead", huge, alive=False)
    assert "forged-live" not in app.store.workers()
    # Read before a live worker starts: its clean-up of dead workers would remove it.
    assert app.store.dead_workers().get("forged-dead", "absent") is None
    start_worker()

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    # Sending reads the registry (whose workers share the secret); the worker's own
    # clean-up of dead workers reads it too, and keeps serving.
    assert add.delay(2, 3).get(timeout=30) == 5
    time.sleep(1.0)  # a few heartbeats: the clean-up of dead workers has run
    assert add.delay(4, 5).get(timeout=30) == 9


def test_a_held_size_too_large_for_a_float_does_not_break_status(
    app: App, access: RawBroker
) -> None:
    """What ``nbtask status`` shows of a process's holdings, forged with a huge size."""
    prefix = access.settings.key_prefix
    _forge_worker(access, "forged-live", json.dumps(_entry()), alive=True)
    held = {"values": [{"name": "x", "size": 10**400, "made_by": "cell"}], "datasets": []}
    access.store.hset(f"{prefix}:holdings", "forged-0", json.dumps(held))
    workers = app.store.workers()
    holdings = app.store.holdings(workers["forged-live"].consumers)
    lines = holdings_lines(workers["forged-live"], holdings)  # what status prints
    assert all(isinstance(line, str) for line in lines)


# Blobs -------------------------------------------------------------------------------------------
def test_a_blob_chunk_of_another_redis_type_is_a_blob_error(app: App) -> None:
    store = app.store
    store.chunk_bytes = 1000  # type: ignore[attr-defined]
    data = bytes(range(256)) * 20  # six chunks
    digest = digest_of(data)
    store.put_blobs({digest: data})
    keys = store._blob_keys(digest, len(data))  # type: ignore[attr-defined]
    redis = store.link.redis  # type: ignore[attr-defined]
    redis.delete(keys[2])
    redis.rpush(keys[2], b"not a string")
    with pytest.raises(BlobError):
        store.get_blob(digest, len(data))


def test_an_argument_blob_of_another_redis_type_fails_the_task_saying_so(
    app: App, start_worker, access: RawBroker
) -> None:
    @app.task
    def length(data: Any) -> int:
        return len(data)

    handle = length.apply_async((np.ones(ARRAY_BYTES // 8),), countdown=1)
    (key,) = access.store.scan_iter(match=f"{access.settings.key_prefix}:blob:*")
    access.store.delete(key)
    access.store.sadd(key, b"not a string")
    start_worker()
    with pytest.raises(BlobError):
        handle.get(timeout=30)


@pytest.mark.parametrize("planted", ["short", "wrong type"])
def test_a_blob_planted_before_its_value_is_sent_does_not_stop_the_task(
    app: App, start_worker, access: RawBroker, planted: str
) -> None:
    """A blob's name is its digest, known to anyone who knows the value (zeros, say).

    A key planted under that name before the value is sent, of the wrong size or type,
    must not pass for the blob: the sender writes the real one, and the task runs.
    """
    array = np.zeros(ARRAY_BYTES // 8)
    key = f"{access.settings.key_prefix}:blob:{digest_of(memoryview(array).cast('B'))}:0"
    if planted == "short":
        access.store.set(key, b"\0" * 10, ex=600)
    else:
        access.store.rpush(key, b"\0")
        access.store.expire(key, 600)
    start_worker()

    @app.task
    def total(values: Any) -> float:
        return float(values.sum())

    assert total.delay(array).get(timeout=30) == 0.0


# Clean-up after dead workers -------------------------------------------------------------------
@pytest.mark.brokers("redis")
def test_a_dead_worker_entry_naming_an_unreadable_queue_does_not_stop_the_clean_up(
    app: App, start_worker, access: RawBroker
) -> None:
    """A forged dead worker whose queue's stream is a key of another type comes first in
    the registry: the clean-up after a real dead process, and the move of what waits on
    its own queue, still happen."""
    prefix = access.settings.key_prefix
    access.store.set(f"{prefix}:q:unreadable", "not a stream")
    _forge_worker(access, "forged-bad", json.dumps(_entry(queues=["unreadable"])), alive=False)
    ghost = _entry(consumers=["ghost-0"])
    _forge_worker(access, "ghost", json.dumps(ghost), alive=False)
    # Work waiting on the gone process's own queue (where a kept value was held).
    waiting = app.send_task(ADD, (2, 3), queue=holder_queue("ghost-0"))
    start_worker(concurrency=1)
    assert waiting.get(timeout=30) == 5
    wait_until(
        lambda: access.store.hget(f"{prefix}:workers", "ghost") is None,
        15,
        "the dead worker's entry to be cleaned up",
    )


@pytest.mark.brokers("redis")
def test_what_waits_on_a_queue_without_its_group_is_taken(
    access: RawBroker,
) -> None:
    """A process's own queue whose stream has no group (deleted, or never made by a
    worker) when a dead process's waiting work is moved: the group is made again and
    what waits is taken at once (the dead worker's entry goes right after, so there is
    no next time)."""
    queue = holder_queue("ghost-0")
    stream = access.streams.queue_key(queue)
    access.store.xadd(stream, {"e": b"entry", "n": b"0", "i": b"some-task"})
    (taken,) = access.streams.take_waiting(queue, "ghost-0")
    assert taken.raw == b"entry"
    assert access.streams.take_waiting(queue, "ghost-0") == []


# The index of a notebook's tasks, for re-attaching ------------------------------------------
@pytest.mark.parametrize("where", ["group", "client"])
def test_a_task_index_of_another_type_is_set_aside(app: App, access: RawBroker, where: str) -> None:
    """What a notebook reads when it loads, and to re-attach after a restart."""
    prefix = access.settings.key_prefix
    earlier = f"{prefix}:c:{'e' * 32}"
    app.store.recent_tasks("notebook", earlier, 0)
    if where == "group":
        access.store.set(f"{prefix}:client-group:notebook", "not a sorted set")
        expected: list[str] = []
    else:
        access.store.zadd(app.store.client_tasks_key(earlier), {"earlier-task": time.time()})
        access.store.set(app.store.client_tasks_key(app.channel), "not a sorted set")
        expected = ["earlier-task"]
    app.store.recent_tasks("notebook", app.channel, 0)  # what loading the extension does
    found = app.store.recent_tasks("notebook", app.channel, 10)
    assert [task_id for task_id, _, _ in found] == expected


def test_a_client_task_index_of_another_type_does_not_stop_sending(
    app: App, start_worker, access: RawBroker
) -> None:
    """The index is written with each task sent, in the script that queues it."""
    access.store.set(app.store.client_tasks_key(app.channel), "not a sorted set")
    start_worker()
    assert app.send_task(ADD, (2, 3)).get(timeout=30) == 5
    assert app.send_task(ADD, (4, 5), countdown=0.2).get(timeout=30) == 9
    found = app.store.recent_tasks("notebook", app.channel, 10)
    assert len(found) == 2


# What each process holds ---------------------------------------------------------------------
def test_a_holdings_key_of_another_type_does_not_fail_a_task_that_loads_a_dataset(
    app: App, start_worker, access: RawBroker
) -> None:
    """What a process holds is announced for ``status`` alone: never a task's failure."""
    prefix = access.settings.key_prefix
    access.store.set(f"{prefix}:holdings", "not a hash")
    start_worker("--data", "squares=tests.sample_tasks:load_squares", concurrency=1)

    @app.task(requires="squares")
    def count(squares: list[int]) -> int:
        return len(squares)

    assert count.delay().get(timeout=30) == 10
    (info,) = app.store.workers().values()
    assert app.store.holdings(info.consumers)  # announced again, in a hash


# The worker registry's own key -----------------------------------------------------------------
def test_a_registry_key_of_another_type_does_not_stop_lease_renewal(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    """The registry is written as a worker starts, and at each heartbeat before the leases
    of running tasks are renewed: workers start, and a task running past the visibility
    timeout still runs once, and ends."""
    registry = f"{access.settings.key_prefix}:workers"
    access.store.set(registry, "not a hash")
    start_worker(concurrency=1)
    start_worker(concurrency=1)
    marker = tmp_path / "marker"
    handle = app.send_task(SLOW_EARLY, (str(marker), 6.0))  # three visibility timeouts
    wait_until(marker.exists, 15, "the task to start")
    access.store.delete(registry)
    access.store.set(registry, "not a hash")
    pid = handle.get(timeout=60)
    assert [int(line) for line in marker.read_text().split()] == [pid]
    assert app.store.workers()  # the registry is written again


@pytest.mark.parametrize("lock", ["no expiry", "another type"])
def test_a_forged_clean_up_lock_does_not_keep_a_dead_workers_work_waiting(
    app: App, start_worker, access: RawBroker, lock: str
) -> None:
    """The lock naming who cleans up after a dead worker expires within two heartbeats;
    one planted without an expiry (or of another type) must not hold forever."""
    prefix = access.settings.key_prefix
    claim = f"{prefix}:reclaim:ghost"
    if lock == "no expiry":
        access.store.set(claim, b"1")
    else:
        access.store.rpush(claim, b"1")
    _forge_worker(access, "ghost", json.dumps(_entry(consumers=["ghost-0"])), alive=False)
    waiting = app.send_task(ADD, (2, 3), queue=holder_queue("ghost-0"))
    start_worker(concurrency=1)
    assert waiting.get(timeout=30) == 5


def test_re_attaching_to_a_task_whose_record_names_a_channel_of_another_type(
    app: App, start_worker, access: RawBroker
) -> None:
    """A finished task's output is replayed from the channel its record names (unsigned);
    a key of another type there leaves the output out, and the signed result stands."""
    start_worker()
    handle = app.send_task(ADD, (2, 3))
    assert handle.get(timeout=30) == 5
    not_a_stream = f"{access.settings.key_prefix}:c:{'a' * 32}"
    assert app.store.is_channel(not_a_stream)
    access.store.hset(not_a_stream, "x", "y")
    access.store.hset(access.keys.record_key(handle.id), "client", not_a_stream)
    other = App("other", settings=app.settings)  # another kernel, re-attaching
    try:
        assert other.handle(handle.id).get(timeout=10) == 5
    finally:
        other.close()


# The ETA sets ----------------------------------------------------------------------------------
def test_an_eta_entry_moved_earlier_in_the_store_does_not_run_the_task_early(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    eta_key = access.keys.eta_key("default")
    ledger = tmp_path / "ledger"
    sent = time.time()
    handle = app.send_task(RECORD_ID, (str(ledger),), countdown=8.0)
    ((member, _),) = access.store.zrange(eta_key, 0, -1, withscores=True)
    access.store.zadd(eta_key, {member: sent - 60})  # due long ago, says the store
    start_worker()
    assert handle.get(timeout=30) == handle.id
    record = app.store.get_record(handle.id)
    assert record is not None and record.started_at is not None
    # A worker starts a task taken less than a second before its eta (the clocks of its
    # sender and the worker may differ by that), as a worker slow to start here may.
    assert record.started_at >= sent + 8.0 - 1.0, "the task ran before its signed eta"
    # Once: its ETA entry gone and nothing left on its queue, and it ran once.
    assert access.store.zcard(eta_key) == 0
    assert access.drained()
    assert ledger_runs(ledger) == {handle.id: 1}


# A client's own event channel ------------------------------------------------------------------
CHATTY = "tests.sample_tasks.chatty"  # prints and reports progress before it ends


@pytest.mark.parametrize("how", ["another type", "ids used up"])
def test_a_client_channel_nbtask_cannot_append_to_is_replaced_and_brings_the_results(
    app: App, start_worker, access: RawBroker, how: str
) -> None:
    """A client's channel (its name is in every record it sent) replaced by a key of
    another type, or given an entry at the last possible id: Redis refuses every event
    appended to it. The first write replaces it, with one log line; the client's tasks
    end, and its later ones too."""
    worker = start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3
    if how == "another type":
        access.store.delete(app.channel)
        access.store.set(app.channel, "not a stream")
    else:
        access.store.xadd(app.channel, {"e": b"junk"}, id=f"{2**64 - 1}-{2**64 - 1}")
    assert app.send_task(CHATTY, (3,)).get(timeout=30) == 3
    assert app.send_task(ADD, (2, 3)).get(timeout=30) == 5
    said = [line for line in worker.log.read_text().splitlines() if "did not write" in line]
    assert len(said) == 1 and app.channel in said[0], said
