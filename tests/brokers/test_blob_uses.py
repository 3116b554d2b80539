"""A blob's uses: a kept value's store copy goes once no use needs the bytes any more.

Blobs are named by content, so a blob is shared by every value of the same bytes. A kept
value notes itself as a keeper of its blobs, and so do a task's arguments until the task
has ended; anything else written (a task's result) pins them for ``result_ttl``. A release
removes one keeper; the blob goes with the last one, unless it is pinned. Both brokers
(the store is the real Redis beside either).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App, Task
from nbtask.notebook.kept import RemoteValue, keep
from nbtask.wire.blobs import Packed, digest_of

pytestmark = pytest.mark.brokers

DATA = bytes(range(256)) * 1024  # 256 KiB: one blob


def _keys(access: RawBroker) -> list[bytes]:
    """The test's blob chunks and their notes of uses."""
    prefix = access.settings.key_prefix
    return sorted(
        [
            *access.store.scan_iter(match=f"{prefix}:blob:*"),
            *access.store.scan_iter(match=f"{prefix}:blobref:*"),
        ]
    )


def test_a_blob_goes_with_its_last_keeper_and_a_repeated_release_deletes_nothing(
    app: App, access: RawBroker
) -> None:
    digest, store = digest_of(DATA), app.store
    store.put_blobs({digest: DATA}, "first")
    store.put_blobs({digest: DATA}, "second")  # another value of the same bytes
    assert store.release_blobs({"first": {digest: len(DATA)}}) == []
    assert bytes(store.get_blob(digest, len(DATA))) == DATA
    assert store.release_blobs({"second": {digest: len(DATA)}}) == [digest]
    assert _keys(access) == []
    store.put_blobs({digest: DATA}, "third")  # kept again, by a new value
    assert store.release_blobs({"second": {digest: len(DATA)}}) == []  # replayed
    assert bytes(store.get_blob(digest, len(DATA))) == DATA
    assert store.release_blobs({"third": {digest: len(DATA)}}) == [digest]
    assert _keys(access) == []


@pytest.mark.parametrize("pinned_first", [True, False])
def test_a_blob_also_written_as_a_result_stays_until_its_ttl(
    app: App, access: RawBroker, pinned_first: bool
) -> None:
    digest, store = digest_of(DATA), app.store
    writes = [lambda: store.put_blobs({digest: DATA}), lambda: store.put_blobs({digest: DATA}, "k")]
    for write in writes if pinned_first else reversed(writes):
        write()
    assert store.release_blobs({"k": {digest: len(DATA)}}) == []
    assert bytes(store.get_blob(digest, len(DATA))) == DATA
    assert all(access.store.ttl(key) > 0 for key in _keys(access))


def test_a_kept_value_of_the_same_bytes_as_a_task_result_leaves_the_result_readable(
    app: App, start_worker, access: RawBroker
) -> None:
    start_worker()

    @app.task
    def make() -> Any:
        return np.arange(800_000.0)  # 6.4 MB: over blob_threshold, the result is a blob

    handle = make.delay()
    handle.get(timeout=30)
    value = np.arange(800_000.0)
    kept = keep("same", value, Packed.of(value), app.store.put_blobs)
    assert set(kept.blob_sizes) <= {key.split(b":")[-2].decode() for key in _keys(access)}
    assert app.store.release_blobs({kept.keeper: kept.blob_sizes}) == []
    other = App("other", settings=app.settings)  # another kernel reads the result later
    try:
        assert np.array_equal(other.handle(handle.id).get(timeout=10), value)
    finally:
        other.close()


@pytest.fixture
def on_one_host(app: App, tmp_path: Path) -> Iterator[tuple[App, Path]]:
    """A client whose blobs are files in a directory of its own."""
    directory = tmp_path / "blobs"
    local = App("local", settings=app.settings.replace(blob_dir=str(directory)))
    yield local, directory
    local.close()


def test_on_one_host_a_released_blob_file_is_removed_unless_pinned(
    on_one_host: tuple[App, Path], access: RawBroker
) -> None:
    local, directory = on_one_host
    value = np.arange(300_000.0)
    kept: RemoteValue = keep("x", value, Packed.of(value), local.store.put_blobs)
    (digest,) = kept.blob_sizes
    assert [path.name for path in directory.iterdir()] == [digest]
    assert local.store.release_blobs({kept.keeper: kept.blob_sizes}) == [digest]
    assert list(directory.iterdir()) == [] and _keys(access) == []
    kept = keep("x", value, Packed.of(value), local.store.put_blobs)
    local.store.pin_blobs(kept.blob_sizes)  # a message refers to it
    assert local.store.release_blobs({kept.keeper: kept.blob_sizes}) == []
    assert [path.name for path in directory.iterdir()] == [digest]


ARRAY = np.arange(800_000.0)  # 6.4 MB: over blob_threshold, an argument travels as a blob


def _gone(access: RawBroker, value: Any) -> bool:
    """True once the store holds no chunk nor note of uses for ``value``'s bytes."""
    digest = digest_of(value)
    return not any(digest.encode() in key for key in _keys(access))


@pytest.mark.parametrize("ending", ["success", "failure"])
def test_an_ended_tasks_argument_blob_goes_and_its_result_stays(
    app: App, start_worker, access: RawBroker, ending: str
) -> None:
    start_worker()

    @app.task
    def shifted(values: Any, fail: bool) -> Any:
        if fail:
            raise ValueError("as asked")
        return values + 1.0  # a result over blob_threshold: pinned for result_ttl

    handle = shifted.delay(ARRAY, ending == "failure")
    if ending == "failure":
        with pytest.raises(ValueError, match="as asked"):
            handle.get(timeout=30)
    else:
        assert np.array_equal(handle.get(timeout=30), ARRAY + 1.0)
        assert not _gone(access, ARRAY + 1.0)
    wait_until(lambda: _gone(access, ARRAY), 10, "the argument's blob to go")
    if ending == "success":
        assert not _gone(access, ARRAY + 1.0), "the result's blob went with the argument's"
        other = App("other", settings=app.settings)  # another kernel re-attaches later
        try:
            assert np.array_equal(other.handle(handle.id).get(timeout=10), ARRAY + 1.0)
        finally:
            other.close()


def test_a_retried_task_reads_its_argument_again_and_it_goes_after_the_last_try(
    app: App, start_worker, access: RawBroker
) -> None:
    start_worker()

    @app.task(bind=True, max_retries=2)
    def total(self: Task, values: Any) -> tuple[int, float]:
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError("not yet"), countdown=0.2)
        return self.request.retries, float(values.sum())

    assert total.delay(ARRAY).get(timeout=30) == (2, pytest.approx(ARRAY.sum()))
    wait_until(lambda: _gone(access, ARRAY), 10, "the argument's blob to go")


def test_an_argument_shared_with_a_waiting_task_or_a_kept_value_stays_for_them(
    app: App, start_worker, access: RawBroker
) -> None:
    start_worker()

    @app.task
    def total(values: Any) -> float:
        return float(values.sum())

    kept = keep("same", ARRAY, Packed.of(ARRAY), app.store.put_blobs)
    later = total.apply_async((ARRAY,), countdown=2.0)
    assert total.delay(ARRAY).get(timeout=30) == pytest.approx(ARRAY.sum())
    assert later.get(timeout=30) == pytest.approx(ARRAY.sum())  # its blob was still there
    assert not _gone(access, ARRAY), "a blob a kept value needs went with a task's end"
    app.store.release_blobs({kept.keeper: kept.blob_sizes})
    wait_until(lambda: _gone(access, ARRAY), 10, "the blob to go with its last use")


def test_whether_a_store_copy_is_whole_is_asked_of_every_chunk(app: App, access: RawBroker) -> None:
    store = app.store
    store.chunk_bytes = 100_000  # type: ignore[attr-defined]
    digest, sizes = digest_of(DATA), {digest_of(DATA): len(DATA)}
    assert not store.has_blobs(sizes)
    store.put_blobs({digest: DATA}, "k")
    assert store.has_blobs(sizes) and store.has_blobs({})
    chunks = sorted(access.store.scan_iter(match=f"{access.settings.key_prefix}:blob:*"))
    assert len(chunks) == 3
    access.store.delete(chunks[1])
    assert not store.has_blobs(sizes)


def test_on_one_host_a_store_copy_is_its_file(on_one_host: tuple[App, Path]) -> None:
    local, directory = on_one_host
    digest, sizes = digest_of(DATA), {digest_of(DATA): len(DATA)}
    local.store.put_blobs({digest: DATA}, "k")
    assert local.store.has_blobs(sizes)
    (directory / digest).unlink()
    assert not local.store.has_blobs(sizes)
