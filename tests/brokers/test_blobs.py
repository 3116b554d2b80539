"""Large values travel out of band: blobs in the store, named and checked by signed digest.

Both brokers (on RabbitMQ the blobs live in the Redis store beside it). Values of
``blob_threshold`` bytes or more (4 MiB by default) leave their big parts out of the
message; a blob that was altered, truncated or expired is refused before anything is
unpickled, and the task fails saying so.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blake3 import blake3
from helpers import Touch, wait_until
from raw_broker import RawBroker
from tcp_proxy import proxying, via

import nbtask
from nbtask import App, Settings, State
from nbtask.brokers.local_blobs import LocalBlobs
from nbtask.errors import BlobError, BlobGone
from nbtask.wire.blobs import digest_of, split_value

pytestmark = pytest.mark.brokers

ARRAY_BYTES = 6 * 1024 * 1024  # over the default 4 MiB threshold


def _array(seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(ARRAY_BYTES // 8)


def _blob_keys(access: RawBroker) -> list[bytes]:
    return sorted(access.store.scan_iter(match=f"{access.settings.key_prefix}:blob:*"))


def test_large_arguments_and_results_travel_as_blobs(
    app: App, start_worker, access: RawBroker
) -> None:
    start_worker()

    @app.task
    def doubled(values: Any) -> Any:
        return values * 2

    array = _array()
    result = doubled.delay(array).get(timeout=30)
    assert np.array_equal(result, array * 2)
    result[0] = -1.0  # writable, as a local array is
    # The messages held only digests. The argument's blob goes once the task has ended;
    # the result's stays, with a TTL, for a kernel that re-attaches.
    prefix = access.settings.key_prefix
    kept = [f"{prefix}:blob:{digest_of(array * 2)}:0".encode()]
    wait_until(lambda: _blob_keys(access) == kept, 10, "only the result's blob to stay")
    assert access.store.ttl(kept[0]) > 0
    again = doubled.delay(array)
    again.get(timeout=30)
    record = app.store.get_record(again.id)
    assert record is not None and record.result is not None
    assert len(record.result) < 64 * 1024, "the stored result holds the array itself"


def test_the_same_array_sent_twice_is_stored_once(
    app: App, start_worker, access: RawBroker
) -> None:
    @app.task
    def total(values: Any) -> float:
        return float(values.sum())

    array = _array(1)
    first, second = total.delay(array), total.delay(array)
    assert len(_blob_keys(access)) == 1
    start_worker()
    assert first.get(timeout=30) == second.get(timeout=30) == pytest.approx(array.sum())
    wait_until(lambda: not _blob_keys(access), 10, "the blob to go after both tasks")


def test_a_value_over_max_message_bytes_travels_out_of_band(app: App, start_worker) -> None:
    """The message limit bounds messages, not values: 20 MB through 2 MiB messages."""
    start_worker()
    small = App("small", settings=app.settings.replace(max_message_bytes=2 * 1024 * 1024))
    try:

        @small.task
        def length(data: bytes) -> int:
            return len(data)

        payload = pickle.PickleBuffer(bytearray(20 * 1024 * 1024))
        assert length.delay(payload).get(timeout=30) == 20 * 1024 * 1024
    finally:
        small.close()


def _tamper_with_the_argument_blob(access: RawBroker, trace: Path) -> None:
    """Replace the one argument blob with a same-sized pickle that leaves a trace."""
    (key,) = _blob_keys(access)
    size = access.store.strlen(key)
    forged = pickle.dumps(Touch(trace), protocol=5)
    access.store.set(key, forged + b"\0" * (size - len(forged)), keepttl=True)


def test_a_tampered_argument_blob_is_refused_and_nothing_is_unpickled(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    trace = tmp_path / "unpickled"

    @app.task
    def length(data: Any) -> int:
        return len(data)

    # A list of byte strings pickles in-band: the pickle stream itself is the blob.
    handle = length.apply_async(([bytes([i % 256]) * 1024 for i in range(6000)],), countdown=1)
    _tamper_with_the_argument_blob(access, trace)
    start_worker()
    with pytest.raises(BlobError, match="does not match its signed digest"):
        handle.get(timeout=30)
    assert not trace.exists(), "a tampered blob was unpickled"
    assert app.store.get_record(handle.id).state is State.FAILURE


def test_an_expired_argument_blob_fails_the_task_saying_so(
    app: App, start_worker, access: RawBroker
) -> None:
    @app.task
    def length(data: Any) -> int:
        return len(data)

    handle = length.apply_async((_array(2),), countdown=1)
    access.store.delete(*_blob_keys(access))
    start_worker()
    with pytest.raises(BlobGone, match="no longer in the store") as raised:
        handle.get(timeout=30)
    # Rebuilt from its parts on the client: its remedy said once, at the end.
    assert str(raised.value).count("run the task again") == 1
    assert str(raised.value).endswith("; run the task again")


def test_a_tampered_result_blob_is_refused_by_the_client(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    start_worker()

    @app.task
    def make() -> list[bytes]:
        return [bytes([i % 256]) * 1024 for i in range(6000)]

    handle = make.delay()
    handle.get(timeout=30)
    (key,) = _blob_keys(access)
    trace = tmp_path / "unpickled"
    forged = pickle.dumps(Touch(trace), protocol=5)
    access.store.set(key, forged + b"\0" * (access.store.strlen(key) - len(forged)), keepttl=True)
    other = App("other", settings=app.settings)  # another kernel, re-attaching
    try:
        with pytest.raises(nbtask.NbtaskError, match="does not match its signed digest"):
            other.handle(handle.id).get(timeout=10)
    finally:
        other.close()
    assert not trace.exists(), "a tampered blob was unpickled"


def test_blobs_are_read_in_chunks_and_a_missing_chunk_is_an_error(app: App) -> None:
    store = app.store
    store.chunk_bytes = 1000  # type: ignore[attr-defined]
    data = bytes(range(256)) * 20  # 5,120 bytes: six chunks
    digest = digest_of(data)
    store.put_blobs({digest: data})
    assert bytes(store.get_blob(digest, len(data))) == data
    store.put_blobs({digest: data})  # kept already: only its expiry is refreshed
    keys = store._blob_keys(digest, len(data))  # type: ignore[attr-defined]
    assert len(keys) == 6
    store.link.redis.delete(keys[3])  # type: ignore[attr-defined]
    with pytest.raises(BlobError, match="no longer in the store"):
        store.get_blob(digest, len(data))


def test_small_values_stay_inline_and_large_ones_split(app: App) -> None:
    small = split_value(np.zeros(10), app.settings.blob_threshold)
    assert small.blobs == {} and small.layout_json is None
    large = split_value(_array(3), app.settings.blob_threshold)
    assert len(large.blobs) == 1 and large.size > ARRAY_BYTES
    # The pickle stream stays inline: a few hundred bytes that say how to rebuild it.
    assert large.layout[0].digest is None and large.layout[0].size < 1024


@pytest.fixture
def on_one_host(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[App, Path]]:
    """A client and (started after) workers that share ``blob_dir``: blobs skip the store."""
    directory = tmp_path / "blobs"
    monkeypatch.setenv("NBTASK_BLOB_DIR", str(directory))  # read by the worker processes
    local = App("local", settings=app.settings.replace(blob_dir=str(directory)))
    yield local, directory
    local.close()


def test_blobs_go_through_a_shared_directory_on_one_host(
    on_one_host: tuple[App, Path], start_worker, access: RawBroker
) -> None:
    local, directory = on_one_host
    start_worker()

    @local.task
    def doubled(values: Any) -> Any:
        return values * 2

    array = _array(4)
    result = doubled.delay(array).get(timeout=30)
    assert np.array_equal(result, array * 2)
    result[0] = -1.0  # mapped copy-on-write: writable, and the file is unchanged
    # The argument's file goes once the task has ended; the result's stays.
    wait_until(
        lambda: [path.name for path in directory.iterdir()] == [digest_of(array * 2)],
        10,
        "only the result's file to stay",
    )
    assert _blob_keys(access) == []
    assert oct(directory.stat().st_mode & 0o777) == oct(0o700)


def test_a_tampered_blob_in_the_shared_directory_is_refused(
    on_one_host: tuple[App, Path], start_worker, tmp_path: Path
) -> None:
    local, directory = on_one_host
    trace = tmp_path / "unpickled"

    @local.task
    def length(data: Any) -> int:
        return len(data)

    handle = length.apply_async(([bytes([i % 256]) * 1024 for i in range(6000)],), countdown=1)
    (path,) = directory.iterdir()
    forged = pickle.dumps(Touch(trace), protocol=5)
    path.write_bytes(forged + b"\0" * (path.stat().st_size - len(forged)))
    start_worker()
    with pytest.raises(BlobError, match="does not match its signed digest"):
        handle.get(timeout=30)
    assert not trace.exists(), "a tampered blob was unpickled"


@pytest.fixture
def full_blob_dir(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[App, Path]]:
    """``on_one_host`` with its directory on a 1 MiB memory filesystem (mounted as root)."""
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root: run the suite as root (scripts/test)")
    directory = tmp_path / "small"
    directory.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(directory)], check=True
    )
    monkeypatch.setenv("NBTASK_BLOB_DIR", str(directory))
    local = App("local", settings=app.settings.replace(blob_dir=str(directory)))
    try:
        yield local, directory
    finally:
        local.close()
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_large_values_a_full_blob_directory_has_no_room_for_go_through_the_store(
    full_blob_dir: tuple[App, Path], start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    local, directory = full_blob_dir
    start_worker()

    @local.task
    def reversed_array(values: Any) -> Any:
        return values[::-1].copy()

    values = np.frombuffer(os.urandom(ARRAY_BYTES), dtype=np.uint8)  # past the 1 MiB there is
    with caplog.at_level("WARNING", logger="nbtask"):
        assert np.array_equal(reversed_array.delay(values).get(timeout=60), values[::-1])
    said = [r.getMessage() for r in caplog.records if "no room for" in r.getMessage()]
    assert said and str(directory) in said[0] and "NBTASK_BLOB_DIR" in said[0]
    # Nothing half-written is left to fill the directory for every other process.
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_a_blob_directory_others_may_write_to_is_not_used(app: App, tmp_path: Path) -> None:
    directory = tmp_path / "open-to-all"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    settings = app.settings.replace(blob_dir=str(directory))
    assert LocalBlobs.open(settings.broker_url or "", settings) is None
    directory.chmod(0o700)
    opened = LocalBlobs.open(settings.broker_url or "", settings)
    assert opened is not None and opened.directory == directory


def test_a_large_result_stays_in_the_store_until_get_reads_it(
    app: App, start_worker, access: RawBroker
) -> None:
    """The listener does not fetch a large result: get() does, on the asking thread."""
    start_worker()

    @app.task
    def make(seed: int) -> Any:
        import numpy as np

        return np.random.default_rng(seed).random(ARRAY_BYTES // 8)  # as _array(seed)

    kept, gone = make.delay(5), make.delay(6)
    for handle in (kept, gone):
        assert handle.exception(timeout=30) is None  # done, its value not read yet
    (gone_key,) = [k for k in _blob_keys(access) if access.store.strlen(k) and _is_blob_of(k, 6)]
    access.store.delete(gone_key)
    assert np.array_equal(kept.get(timeout=1), _array(5))
    with pytest.raises(BlobError, match="no longer in the store"):
        gone.get(timeout=1)


def _is_blob_of(key: bytes, seed: int) -> bool:
    digest = key.decode().split(":")[-2]
    return digest == split_value(_array(seed), 0).layout[1].digest


def test_large_blobs_are_named_by_their_pieces_and_any_change_renames_them() -> None:
    data = bytearray(np.random.default_rng(9).bytes(20 * 1024 * 1024))  # three pieces
    name = digest_of(data)
    assert name == digest_of(bytes(data)) and len(name) == 64
    data[-1] ^= 1  # one bit in the last piece
    assert digest_of(data) != name
    assert digest_of(b"small") == blake3(b"small").hexdigest()
    piece_bytes = 8 * 1024 * 1024
    pieces = [bytes(data[i : i + piece_bytes]) for i in range(0, len(data), piece_bytes)]
    label = b"nbtask pieces\x00" + b"".join(blake3(piece).digest() for piece in pieces)
    assert digest_of(data) == blake3(label).hexdigest()


def test_a_forked_process_names_large_blobs_as_its_parent_does() -> None:
    """A worker's children are forked: the hashing threads must not be inherited half-made."""
    data = np.random.default_rng(3).bytes(20 * 1024 * 1024)
    name = digest_of(data)  # the parent's hashing threads exist now
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write_end, digest_of(data).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        told = pipe.read().decode()
    os.waitpid(child, 0)
    assert told == name


def test_a_blob_set_aside_while_its_release_asks_the_store_is_still_read(
    tmp_path: Path,
) -> None:
    """A reader in the gap of ``remove`` (file set aside, store asked) finds the blob.

    Its use was noted before it was sent, so the store answers that the blob is needed and
    it goes back; the reader must not miss it meanwhile.
    """
    (tmp_path / "blobs").mkdir(mode=0o700)
    blobs = LocalBlobs(tmp_path / "blobs", 3600)
    data = os.urandom(1000)
    digest = digest_of(data)
    blobs.put({digest: data})
    read_meanwhile: list[bytes | None] = []

    def in_use() -> bool:
        mapped = blobs.get(digest, len(data))
        read_meanwhile.append(None if mapped is None else bytes(mapped))
        return True

    blobs.remove(digest, in_use)
    assert read_meanwhile == [data]
    assert (tmp_path / "blobs" / digest).read_bytes() == data  # given back
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [digest]


def test_a_connection_dropped_under_a_blob_read_is_read_again_on_a_new_one(
    settings: Settings,
) -> None:
    # The store's connections go through a proxy: after the first chunk, the next read
    # is held on its way to Redis and the connection cut under it, as a network blip or
    # a proxy's idle cut does mid-load.
    store_url = settings.result_url or settings.broker_url
    with proxying(store_url, 6379) as proxy:
        through = via(store_url, proxy.url_port)
        if settings.result_url is None:
            proxied = settings.replace(broker_url=through)
        else:
            proxied = settings.replace(result_url=through)
        with App("cut", settings=proxied) as cut:
            store = cut.store
            store.chunk_bytes = 1000  # type: ignore[attr-defined]
            data = bytes(range(256)) * 20  # six chunks
            digest = digest_of(data)
            store.put_blobs({digest: data})
            cuts: list[threading.Timer] = []

            def cut_under_the_next_read(_: int) -> None:
                if not cuts:
                    proxy.hold()
                    cuts.append(threading.Timer(0.5, proxy.cut))
                    cuts[0].start()

            try:
                assert bytes(store.get_blob(digest, len(data), cut_under_the_next_read)) == data
            finally:
                for timer in cuts:
                    timer.join()
            assert cuts, "no chunk was read"
