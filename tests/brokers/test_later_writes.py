"""A kept value's store copy written after the cell ended: readers wait for it, whole.

The process that keeps a large value holds it live, so its store copy is written in the
background (``put_blobs(..., later=True)``). Until it is written its lease says it is
coming: a reader waits instead of finding it missing, a copy released meanwhile leaves
nothing behind, and a writer that stopped is reported once its lease lapses. In Redis
and in shared memory (one host), on the real Redis.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from raw_broker import RawBroker
from tcp_proxy import TcpProxy, via

from nbtask import App
from nbtask.errors import BlobError
from nbtask.wire.blobs import digest_of

pytestmark = pytest.mark.brokers

DATA = bytes(range(256)) * 1024  # 256 KiB: three chunks of 100,000 bytes in Redis
DIGEST, SIZES = digest_of(DATA), {digest_of(DATA): len(DATA)}


@pytest.fixture(params=["redis", "one host"])
def store(request: pytest.FixtureRequest, app: App, tmp_path: Path) -> Iterator[Any]:
    """A store writing later from 0 bytes on: through Redis (in chunks), or files here."""
    chosen = app
    if request.param == "one host":
        chosen = App("local", settings=app.settings.replace(blob_dir=str(tmp_path / "blobs")))
    chosen.store.chunk_bytes = 100_000
    chosen.store.later_bytes = 0
    yield chosen.store
    assert chosen.store.finish_writes(30)
    if chosen is not app:
        chosen.close()


def _gated(store: Any) -> threading.Event:
    """Hold the store's background writes until the returned event is set."""
    gate, write = threading.Event(), store._write

    def held(blobs: Any, *, renew: bool = False) -> None:
        if renew:  # a background write (one made now goes as it is)
            gate.wait(30)
        write(blobs, renew=renew)

    store._write = held
    return gate


def _traces(access: RawBroker, store: Any) -> list[Any]:
    """What the store keeps of the blob: chunks, uses, lease, and files in shared memory."""
    prefix = access.settings.key_prefix
    keys = [
        key
        for kind in ("blob", "blobref", "blobwriting")
        for key in access.store.scan_iter(match=f"{prefix}:{kind}:*")
    ]
    files = list(store.local_blobs.directory.iterdir()) if store.local_blobs else []
    return sorted(map(str, keys + files))


def _reading(store: Any) -> tuple[threading.Thread, Callable[[], Any]]:
    """A reader of the blob on a thread of its own, and what it got (bytes or an error)."""
    got: list[Any] = []

    def read() -> None:
        try:
            got.append(bytes(store.get_blob(DIGEST, len(DATA))))
        except BlobError as exc:
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, lambda: got[0] if got else None


def test_a_copy_written_later_is_waited_for_and_read_whole(store: Any) -> None:
    gate = _gated(store)
    store.put_blobs({DIGEST: DATA}, "kept", later=True)  # returns before writing
    store.start_writes()  # the cell's outcome is out
    assert not store.has_blobs(SIZES)  # not whole yet: work waits for the holder
    reader, got = _reading(store)
    reader.join(0.5)
    assert reader.is_alive() and got() is None, "the reader did not wait for the copy"
    gate.set()
    reader.join(30)
    assert got() == DATA
    assert store.finish_writes(30) and store.has_blobs(SIZES)


def test_a_copy_is_written_only_once_the_outcome_is_out(store: Any, access: RawBroker) -> None:
    # Hundreds of megabytes on their way into Redis would hold up the cell's outcome.
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    assert store.holds_writes()
    reader, got = _reading(store)
    time.sleep(0.3)
    assert not store.has_blobs(SIZES), "the copy was written before its outcome went out"
    assert not any(":blob:" in trace or "/blobs/" in trace for trace in _traces(access, store))
    store.start_writes()
    assert not store.holds_writes()
    reader.join(30)
    assert got() == DATA
    assert store.finish_writes(30) and store.has_blobs(SIZES)


def test_a_copy_released_while_it_is_written_leaves_nothing_behind(
    store: Any, access: RawBroker
) -> None:
    gate = _gated(store)
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    store.start_writes()
    store.release_blobs({"kept": SIZES})  # the notebook let go of the value meanwhile
    gate.set()
    assert store.finish_writes(30)
    assert _traces(access, store) == []


def test_a_copy_whose_writer_stopped_is_reported_missing_once_its_lease_lapses(
    store: Any,
) -> None:
    store.lease_seconds = 1
    store._write_later = lambda blobs, writer: None  # the process died before writing
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    store.start_writes()
    reader, got = _reading(store)
    reader.join(30)
    assert isinstance(got(), BlobError)
    assert "no longer in the store" in str(got()) and "the worker writing it stopped" in str(got())


def test_a_small_copy_asked_for_later_is_written_at_once(store: Any) -> None:
    store.later_bytes = len(DATA) + 1
    _gated(store)  # a background write would wait for good
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    assert store.has_blobs(SIZES)
    assert bytes(store.get_blob(DIGEST, len(DATA))) == DATA


def test_a_lease_nbtask_did_not_write_keeps_no_reader_waiting(
    store: Any, access: RawBroker
) -> None:
    lease = f"{access.settings.key_prefix}:blobwriting:{DIGEST}"
    access.store.set(lease, "forged")  # no expiry: anyone with write access to Redis
    with pytest.raises(BlobError, match="no longer in the store"):
        store.get_blob(DIGEST, len(DATA))
    access.store.set(lease, "forged", ex=3600)  # longer than any lease nbtask takes
    with pytest.raises(BlobError, match="no longer in the store"):
        store.get_blob(DIGEST, len(DATA))
    access.store.delete(lease)
    access.store.hset(lease, "a", "b")  # another type: the writer's last step still ends
    access.store.expire(lease, 3600)
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    assert store.finish_writes(30)
    assert bytes(store.get_blob(DIGEST, len(DATA))) == DATA


def test_a_lease_renewed_without_its_blob_keeps_no_reader_waiting_for_good(
    store: Any, access: RawBroker
) -> None:
    # Someone who can write to Redis renews a lease as nbtask's writer would, for good.
    lease = f"{access.settings.key_prefix}:blobwriting:{DIGEST}"
    store.wait_seconds = 1
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.2):
            access.store.set(lease, "forged", ex=store.lease_seconds)

    access.store.set(lease, "forged", ex=store.lease_seconds)
    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with pytest.raises(BlobError, match="still marked as being written after 1 s"):
            store.get_blob(DIGEST, len(DATA))
        assert renewer.is_alive()  # the reader gave up while the lease was still renewed
    finally:
        stop.set()
        renewer.join(5)
        access.store.delete(lease)


def test_a_copy_queued_behind_a_slow_write_is_still_waited_for(store: Any) -> None:
    store.lease_seconds = 1
    _slowed(store, pause=0.3)  # each chunk, or file, takes 0.3 s
    # A value kept just before, of six blobs of a chunk each: about 2 s to write first.
    first = [bytes([i]) * 100_000 for i in range(6)]
    store.put_blobs({digest_of(data): data for data in first}, "first", later=True)
    store.put_blobs({DIGEST: DATA}, "kept", later=True)  # its lease waits in the queue
    store.start_writes()
    reader, got = _reading(store)
    reader.join(60)
    assert got() == DATA, "the reader gave up on a copy its live writer was about to write"


def _slowed(store: Any, pause: float) -> None:
    """Make the store's writes of chunks (or files) slow, as over a slow network."""
    if store.local_blobs is not None:
        put = store.local_blobs.put

        def slow_put(blobs: Any) -> None:
            for digest, data in blobs.items():
                time.sleep(pause)
                put({digest: data})

        store.local_blobs.put = slow_put
        return
    run = store.link.run

    def slow_run(commands: Any, **options: Any) -> Any:
        if not options.get("large"):
            return run(commands, **options)
        replies = []
        for command in commands:
            if command[0] == "SET":
                time.sleep(pause)
            replies += run([command], **options)
        return replies

    store.link.run = slow_run


@pytest.fixture
def cut_off(app: App) -> Iterator[tuple[Any, TcpProxy]]:
    """A store (writing later from 0 bytes on) reaching Redis through a proxy, and the proxy.

    The test's ``app`` reads what it wrote, with the same chunks.
    """
    url = app.settings.result_url or app.settings.broker_url or ""
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    proxy.start()
    field = "result_url" if app.settings.result_url else "broker_url"
    proxied = App("proxied", settings=app.settings.replace(**{field: via(url, proxy.url_port)}))
    store = proxied.store
    store.chunk_bytes, store.later_bytes, store.lease_seconds = 100_000, 0, 1
    app.store.chunk_bytes = store.chunk_bytes
    try:
        yield store, proxy
    finally:
        proxy.accept_again()
        assert store.finish_writes(60)
        proxied.close()
        proxy.stop()


def _cut_while_writing(store: Any, proxy: TcpProxy, seconds: float) -> None:
    """Keep DATA, its chunks written slowly, and cut the store off for ``seconds`` meanwhile."""
    _slowed(store, pause=0.5)
    store.put_blobs({DIGEST: DATA}, "kept", later=True)
    store.start_writes()
    time.sleep(0.7)  # its first chunk went
    proxy.refuse()  # a Redis restart, a failover: the store is gone for a while
    proxy.cut()
    time.sleep(seconds)
    proxy.accept_again()


def test_a_copy_whose_store_was_unreachable_for_a_while_is_written_once_it_is_back(
    app: App, cut_off: tuple[Any, TcpProxy]
) -> None:
    store, proxy = cut_off
    _cut_while_writing(store, proxy, 2.5)  # longer than the lease
    assert store.finish_writes(60)
    assert bytes(app.store.get_blob(DIGEST, len(DATA))) == DATA


def test_a_copy_its_writer_could_not_write_is_reported_saying_where_to_look(
    app: App, cut_off: tuple[Any, TcpProxy]
) -> None:
    store, proxy = cut_off
    store.retry_seconds = 0  # gives up at once
    _cut_while_writing(store, proxy, 1.5)  # the lease lapsed
    assert store.finish_writes(60)
    with pytest.raises(BlobError, match=r"could not write it \(the worker's log says why\)"):
        app.store.get_blob(DIGEST, len(DATA))


def test_a_copy_once_written_holds_no_memory_of_its_value(store: Any) -> None:
    # The writer's thread must not keep the last value it wrote alive until the next write.
    value = np.frombuffer(bytearray(DATA), dtype=np.uint8)
    gone = weakref.ref(value)
    store.put_blobs({DIGEST: memoryview(value)}, "kept", later=True)
    store.start_writes()
    assert store.finish_writes(30)
    del value
    gc.collect()
    assert gone() is None, "the background writer still holds the value it wrote"


def test_a_chunk_longer_than_nbtask_writes_is_refused_unread(store: Any, access: RawBroker) -> None:
    # Someone who can write to Redis puts a huge string under a blob's key: the reader
    # takes one byte past a chunk, enough to refuse it, not the whole string.
    store.chunk_bytes = 100_000
    key = store._blob_keys(DIGEST, len(DATA))[0]
    access.store.set(key, b"x" * (store.chunk_bytes * 5))
    assert len(store._chunk(key, DIGEST, len(DATA))) == store.chunk_bytes + 1
    if store.local_blobs is None:  # in shared memory the file, not Redis, is read
        with pytest.raises(BlobError):
            store.get_blob(DIGEST, len(DATA))
