"""Large entries planted in the bookkeeping every client and worker reads, by an outsider
with write access to the store but not the secret: the worker registry (an entry with a
live-looking heartbeat key, so no one cleans it up) and a task record (an extra field, or
a plain field far larger than nbtask writes it). Before, each was read whole by every
reader, again and again: memory grew with what was planted. Now only what nbtask writes
is read, up to the size it writes it at; the rest is set aside with one log line. What is
read is measured in the client's own allocations (tracemalloc), not timed. Both brokers
(the store is Redis on both)."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App
from nbtask.brokers.amqp_lost import LostDeliveries
from nbtask.brokers.redis_store import RedisStore
from nbtask.wire.records import WorkerInfo

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
#: What is planted: many times what any reader should take for one entry or field.
PLANTED = 16 << 20
#: What a bounded read may allocate at its peak (a record's plain fields, a few entries).
READ_AT_MOST = 2 << 20

T = TypeVar("T")


def _plant(access: RawBroker, key: str, field: str, size: int) -> None:
    """A field of ``size`` bytes in hash ``key``, built inside Redis (no copy sent)."""
    access.store.eval(
        "redis.call('HSET', KEYS[1], ARGV[1], string.rep('x', tonumber(ARGV[2])))",
        1,
        key,
        field,
        size,
    )


def _peak(call: Callable[[], T]) -> tuple[T, int]:
    """What ``call`` returns, and the most this process's allocations grew while it ran."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        got = call()
        return got, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_large_worker_registry_entry_is_not_read_and_is_set_aside(
    app: App, access: RawBroker, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    workers = f"{app.settings.key_prefix}:workers"
    heartbeat = f"{app.settings.key_prefix}:hb:planted"
    _plant(access, workers, "planted", PLANTED)
    access.store.set(heartbeat, b"1", ex=600)  # looks alive: no supervisor forgets it
    with caplog.at_level(logging.ERROR, logger="nbtask"):
        live, peak = _peak(app.workers)
    assert peak < READ_AT_MOST, f"reading the registry took {peak:,} bytes"
    assert "planted" not in live
    assert len(_said(caplog, "entr(ies) of the worker registry larger than")) == 1
    assert not access.store.hexists(workers, "planted")
    # Planted again, with workers up: they and their clients set it aside as well, and
    # the tasks run.
    _plant(access, workers, "planted", PLANTED)
    start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3
    assert not access.store.hexists(workers, "planted")
    access.store.delete(heartbeat)


def test_large_fields_in_a_task_record_are_not_read(
    app: App, access: RawBroker, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    start_worker(concurrency=1)
    h = app.send_task(ADD, (1, 2))
    assert h.get(timeout=30) == 3
    record = access.keys.record_key(h.id)
    _plant(access, record, "junk", PLANTED)  # a field nbtask never writes
    _plant(access, record, "label", 1 << 20)  # one it writes, far larger than it does
    with caplog.at_level(logging.WARNING, logger="nbtask"):
        kept, peak = _peak(lambda: app.store.get_record(h.id))
    assert peak < READ_AT_MOST, f"reading the record took {peak:,} bytes"
    assert kept is not None and kept.result and kept.label == ""
    said = _said(caplog, f"the task record {record} holds label larger than nbtask writes")
    assert len(said) == 1, said
    assert app.handle(h.id).get(timeout=10) == 3  # a re-attached handle finds the result


@pytest.mark.brokers("amqp")
def test_a_large_field_in_a_parked_lost_delivery_is_not_read(
    app: App, access: RawBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ only: a lost delivery parked in the store for a supervisor to settle,
    given a field nbtask never writes and a holder far larger than nbtask writes it."""
    assert isinstance(app.store, RedisStore)
    lost = LostDeliveries(app.store)
    lost.park("t-lost", b"signed message", "default", 1)
    entry = f"{app.settings.key_prefix}:lost:t-lost"
    _plant(access, entry, "junk", PLANTED)
    _plant(access, entry, "h", 1 << 20)
    with caplog.at_level(logging.WARNING, logger="nbtask"):
        claimed, peak = _peak(lambda: lost.claim(None, ["default"]))
    assert peak < READ_AT_MOST, f"reading the parked delivery took {peak:,} bytes"
    assert [(d.task_id, d.raw) for d in claimed] == [("t-lost", b"signed message")]
    assert len(_said(caplog, f"the lost delivery {entry} holds h larger than")) == 1
    assert lost.settle(claimed[0])


def test_a_planted_task_journal_is_read_only_as_nbtask_writes_it(
    app: App, access: RawBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """``nbtask log`` and ``%nbtask log`` read a journal: planted with 20,000 lines and
    one far longer than a worker writes, only its newest 1,000 lines are read, the long
    one left out with one log line."""
    assert isinstance(app.store, RedisStore)
    key = app.store.journal_key("t-planted")
    access.store.eval(
        "for i = 1, 20000 do redis.call('RPUSH', KEYS[1], 'line ' .. i) end "
        "redis.call('RPUSH', KEYS[1], string.rep('x', tonumber(ARGV[1]))) "
        "redis.call('RPUSH', KEYS[1], 'last') redis.call('EXPIRE', KEYS[1], 600)",
        1,
        key,
        PLANTED,
    )
    with caplog.at_level(logging.WARNING, logger="nbtask"):
        lines, peak = _peak(lambda: app.store.read_journal("t-planted"))
    assert peak < READ_AT_MOST, f"reading the journal took {peak:,} bytes"
    assert lines == [f"line {i}" for i in range(19_003, 20_001)] + ["last"]
    said = _said(caplog, f"the task journal {key} holds 1 line(s) longer than nbtask writes")
    assert len(said) == 1, said
    access.store.delete(key)


def test_a_journal_line_longer_than_a_journal_keeps_is_kept_cut(app: App) -> None:
    """What a handler prints is kept a line at a time, each cut to what a reader takes: its
    head and its tail (a traceback, logged as one record of many lines, ends with the
    exception itself, and reads as its lines)."""
    assert isinstance(app.store, RedisStore)
    cut = " [nbtask: line cut here] "
    traceback = "Traceback:\n" + "  File x, line 1, in f\n" * 4_000 + "ValueError: the reason"
    accented = "é" * 3_000  # (é: two bytes, cut between them)
    app.store.append_journal("t-long", [traceback, accented, "short"])
    try:
        *traced, accented_kept, short = app.store.read_journal("t-long")
        assert traced[0] == "Traceback:" and traced[-1] == "ValueError: the reason"
        assert sum(cut in line for line in traced) == 1
        assert len("\n".join(traced).encode()) <= 4_096
        head, tail = accented_kept.split(cut)
        assert accented.startswith(head) and accented.endswith(tail) and head and tail
        assert len(accented_kept.encode()) <= 4_096 and short == "short"
    finally:
        app.store.link.redis.delete(app.store.journal_key("t-long"))


def test_a_registry_of_many_planted_entries_is_read_only_as_far_as_nbtask_writes_it(
    app: App,
    access: RawBroker,
    start_worker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100,000 readable entries planted in the worker registry (each a few hundred bytes,
    no heartbeat). Before, every read took them all, again and again: 81 MB and some
    twenty seconds per read here, for every client and worker. Now at most 1,000
    (``MAX_REGISTERED``) are read, those with a current heartbeat first, and one line
    says someone else wrote them; a genuine worker is still seen and runs tasks.

    The worker beats once a second, not every 0.2 s: the look for dead workers after each
    heartbeat still has Redis walk the planted ids (0.3 to 0.6 s, more on a loaded
    machine) before the next beat is due, and a heartbeat that lives 0.6 s lapsed between
    two: the worker was seen dead about as often as alive, and the check that
    ``workers_if_known()`` agrees with ``workers()`` timed out."""
    monkeypatch.setenv("NBTASK_HEARTBEAT_INTERVAL", "1.0")  # its heartbeat lives 3 s
    monkeypatch.setenv("NBTASK_VISIBILITY_TIMEOUT", "10.0")  # (more than three beats)
    workers = f"{app.settings.key_prefix}:workers"
    planted = WorkerInfo(
        hostname="planted", pid=1, queues=("nbtest-nowhere",), concurrency=1, consumers=()
    )
    access.store.eval(
        "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'p' .. i, ARGV[2]) end",
        1,
        workers,
        100_000,
        planted.to_json(),
    )
    with caplog.at_level(logging.WARNING, logger="nbtask"):
        live, peak = _peak(app.workers)
        assert peak < READ_AT_MOST, f"reading the registry took {peak:,} bytes"
        assert live == {}
        start_worker(concurrency=1)
        wait_until(lambda: len(app.workers()) == 1, 60, "the genuine worker to be seen")
        assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3

        def agree() -> bool:  # (a heartbeat late on a loaded machine hides it a moment)
            known = app.store.workers_if_known()
            return known is not None and list(known) == list(app.workers()) != []

        wait_until(agree, 30, "workers_if_known() to give the genuine worker as workers() does")
    said = _said(caplog, f"the worker registry {workers} holds 100,000 entries, more than")
    assert len(said) == 1, said
    assert "at most 1,000 are read): someone else wrote them" in said[0]
