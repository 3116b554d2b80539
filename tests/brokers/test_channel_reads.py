"""What one read of a client's event channel takes, when someone with write access to the
store (but not the secret) appends many large entries to it: the channel's name is in
every record its client sent. The store is Redis on both brokers."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

from nbtask import App, Settings
from nbtask.brokers.redis_channels import READ_COUNT
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore

MIB = 1024 * 1024
ADD = "tests.sample_tasks.add"


@pytest.fixture
def small(settings: Settings) -> Settings:
    """Messages of at most 1 MiB: the largest event a client accepts."""
    return settings.replace(max_message_bytes=MIB)


@pytest.fixture
def store(small: Settings) -> Iterator[RedisStore]:
    store = RedisStore(RedisLink(small.result_url or small.broker_url or "", "broker"), small)
    yield store
    store.close()


def test_one_read_takes_a_bounded_number_of_bytes_and_no_oversized_entry(
    store: RedisStore, small: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A read took up to 500 entries, whatever their size (500 entries of Redis's 512 MB
    each, in one reply). Now an entry over ``max_message_bytes`` (no event nbtask accepts
    is larger) is never sent to the client: it reads as empty, with one log line. The
    entries taken in one read total at most four such events (and 64 MiB), or one entry;
    the rest follow in the next reads, none lost."""
    caplog.set_level(logging.WARNING, logger="nbtask.brokers.redis_channels")
    channel = store.channel_key("abc")
    redis = store.link.redis
    junk = [redis.xadd(channel, {"e": b"x" * (2 * MIB)}) for _ in range(3)]
    for i in range(20):
        redis.xadd(channel, {"e": bytes([65 + i % 26]) * (MIB // 2)})
    redis.xadd(channel, {"e": b"", "pad": b"y" * (2 * MIB)})  # large in another field
    last = redis.xadd(channel, {"e": b"genuine"})
    try:
        budget = 4 * small.max_message_bytes
        after, reads, seen = "0-0", [], []
        while after != last.decode():
            entries = store.read_events({channel: after}, 0.1)
            assert entries, "a read took nothing while entries were left"
            reads.append(sum(len(raw) for _, _, raw in entries))
            seen += entries
            after = entries[-1][1]
        assert max(reads) <= budget, f"a read took {max(reads):,} bytes, over {budget:,}"
        assert len(reads) > 1
        assert [raw for _, entry, raw in seen if entry.encode() in junk] == [b""] * 3
        assert [raw for _, _, raw in seen if raw] == [
            bytes([65 + i % 26]) * (MIB // 2) for i in range(20)
        ] + [b"genuine"]
        dropped = [r.getMessage() for r in caplog.records if "max_message_bytes" in r.getMessage()]
        assert len(dropped) == 4, dropped
        # Replaying a channel (a re-attached handle), catching up on one (RabbitMQ's
        # client after its reply queue was gone) read the same way.
        assert [raw for raw in store.replay(channel)] == [raw for _, _, raw in seen if raw]
        kept = store.events_after(channel, "0-0")
        assert [entry for entry, _ in kept] == [entry for _, entry, _ in seen]
        assert [raw for _, raw in kept] == [raw for _, _, raw in seen]
    finally:
        redis.delete(channel)


def test_genuine_events_after_an_outsiders_large_entries_still_arrive(
    small: Settings, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask.brokers.redis_channels")
    start_worker(concurrency=1)
    app = App("small", settings=small)
    try:
        assert app.send_task(ADD, (1, 2)).get(timeout=15) == 3  # the listener reads
        store = app.store
        assert isinstance(store, RedisStore)
        for _ in range(3):
            store.link.redis.xadd(app.channel, {"e": b"x" * (2 * MIB)})
        for _ in range(20):
            store.link.redis.xadd(app.channel, {"e": b"y" * (MIB // 2)})
        handles = [app.send_task(ADD, (i, i)) for i in range(5)]
        assert [h.get(timeout=15) for h in handles] == [2 * i for i in range(5)]
        wait_until(
            lambda: sum("max_message_bytes" in r.getMessage() for r in caplog.records) == 3,
            10,
            "the oversized entries to be dropped",
        )
    finally:
        app.close()


def _copies(reply: Any, payload: bytes) -> int:
    """How many times ``payload`` is in a (nested) Redis reply."""
    if isinstance(reply, list):
        return sum(_copies(part, payload) for part in reply)
    return int(reply == payload)


def test_a_read_the_blocking_read_answered_brings_what_came_with_its_entry(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read sent the script, then the blocking read: Redis answered the script at once
    and the blocking read later, so the reading thread slept twice per event, and took
    only the one entry that woke it (the next read took the rest). Now the blocking read
    goes first and the script after it, in the same write: the entries that came with
    the one that woke it arrive in the same read, bounded as the script bounds them (an
    oversized one reads as empty, never copied), and the next read finds nothing."""
    channel = store.channel_key(uuid.uuid4().hex)
    redis = store.link.redis
    oversized = b"x" * (2 * MIB)
    run_scripts = store.link.run_scripts
    writes: list[int] = []
    replies: list[Any] = []
    appended = threading.Event()

    def append_while_blocked() -> None:
        pipe = redis.pipeline(transaction=True)  # both at once: one wakes the reader
        pipe.xadd(channel, {"e": b"genuine"})
        pipe.xadd(channel, {"e": oversized})
        pipe.execute()
        appended.set()

    def counted(commands: Any, **kwargs: Any) -> list[Any]:
        writes.append(len(commands))
        if len(commands) == 2 and not writes[:-1]:  # the first read blocks: append then
            threading.Timer(0.5, append_while_blocked).start()
        reply = run_scripts(commands, **kwargs)
        replies.append(reply)
        return reply

    monkeypatch.setattr(store.link, "run_scripts", counted)
    try:
        read = store.read_events({channel: "0-0"}, 10)
        assert appended.wait(10) and writes == [2]
        assert [raw for _, _, raw in read] == [b"genuine", b""], "one entry a read"
        assert store.read_events({channel: read[-1][1]}, 0.1) == []
        assert writes == [2, 2]
        assert _copies(replies, oversized) == 0
    finally:
        redis.delete(channel)


def test_an_entry_copied_beyond_where_the_script_stopped_is_copied_once(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocking read copies the first entry waiting on each channel; the script after
    it stops at its count. An oversized entry on an adopted channel behind a full read of
    the client's own is copied by the first read's blocking read, and is then read by the
    script alone (as empty) until the script reached it: a second blocking read would
    copy it again."""
    own, adopted = (store.channel_key(uuid.uuid4().hex) for _ in range(2))
    redis = store.link.redis
    oversized = b"x" * (2 * MIB)
    run_scripts = store.link.run_scripts
    writes: list[int] = []
    replies: list[Any] = []

    def counted(commands: Any, **kwargs: Any) -> list[Any]:
        writes.append(len(commands))
        reply = run_scripts(commands, **kwargs)
        replies.append(reply)
        return reply

    monkeypatch.setattr(store.link, "run_scripts", counted)
    try:
        pipe = redis.pipeline(transaction=False)
        for i in range(READ_COUNT + 1):
            pipe.xadd(own, {"e": b"event %d" % i})
        pipe.execute()
        redis.xadd(adopted, {"e": oversized})
        positions = {own: "0-0", adopted: "0-0"}
        first = store.read_events(positions, 0.1)
        assert len(first) == READ_COUNT and writes == [2]
        positions[own] = first[-1][1]
        second = store.read_events(positions, 0.1)
        assert [(c, raw) for c, _, raw in second] == [
            (own, b"event %d" % READ_COUNT),
            (adopted, b""),
        ]
        assert writes == [2, 1], "the read after one that stopped at its count copied again"
        positions.update({c: entry for c, entry, _ in second})
        assert store.read_events(positions, 0.1) == []
        assert _copies(replies, oversized) == 1
    finally:
        redis.delete(own, adopted)
