"""Sealed blobs: a kept value's store copy written later, named by id and sealed as written.

A worker that holds a large kept value live writes its store copy after the cell ended;
its blobs are named by random ids, hashed and sealed (HMAC with the app's secret) by the
background writer, so the hash is off the cell's path. A reader checks each blob against
its seal before anything is unpickled: a blob altered, truncated, swapped or sealed with
another secret is refused like a content-addressed one. In Redis (the seal straddling a
chunk boundary, or in a chunk of its own) and in shared memory, on the real Redis.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from raw_broker import RawBroker

from nbtask import App
from nbtask.core.holding import key_of
from nbtask.errors import BlobError
from nbtask.notebook.kept import RemoteValue, Sealing, keep
from nbtask.wire.blobs import SEAL_BYTES, Packed, open_sealed
from nbtask.wire.envelope import Signer

pytestmark = pytest.mark.brokers

CHUNK = 100_000


class Loaded:
    """A value that notes in ``LOADS`` each time it is unpickled."""

    LOADS: ClassVar[list[int]] = []

    def __init__(self, data: np.ndarray[Any, Any]) -> None:
        self.data = data

    def __setstate__(self, state: dict[str, Any]) -> None:
        Loaded.LOADS.append(1)
        self.__dict__.update(state)


@pytest.fixture(params=["redis", "one host"])
def store(request: pytest.FixtureRequest, app: App, tmp_path: Path) -> Iterator[Any]:
    """A store writing later from 0 bytes on: through Redis (in chunks), or files here."""
    chosen = app
    if request.param == "one host":
        chosen = App("local", settings=app.settings.replace(blob_dir=str(tmp_path / "blobs")))
    chosen.store.chunk_bytes = CHUNK
    chosen.store.later_bytes = 0
    yield chosen.store
    assert chosen.store.finish_writes(30)
    if chosen is not app:
        chosen.close()


def _kept(store: Any, signer: Signer, value: Any) -> tuple[RemoteValue, Sealing]:
    """``value`` kept sealed as a worker keeps it, its copy written in the background."""
    sealing = Sealing(signer)
    put = functools.partial(store.put_blobs, later=True, seal=sealing)
    reference = keep("x", value, Packed.of(value), put, sealed=True)
    sealing.reference = reference
    store.start_writes()  # the cell's outcome is out
    assert store.finish_writes(30)
    return reference, sealing


def _stored(store: Any, name: str, size: int) -> bytes:
    return bytes(store.get_blob(name, size))


def _replace(store: Any, access: RawBroker, name: str, size: int, data: bytes) -> None:
    """Write ``data`` where the blob ``name`` is kept, as an outsider with store access could."""
    if store.local_blobs is not None:
        (store.local_blobs.directory / name).write_bytes(data)
        return
    for key, start in zip(store._blob_keys(name, size), range(0, size, CHUNK), strict=True):
        access.store.set(key, data[start : start + CHUNK])


# Chunks of 100,000 bytes: the seal in the last chunk with the last bytes, across the
# boundary of two chunks, and in a chunk of its own.
@pytest.mark.parametrize("items", [24_990, 25_000 - SEAL_BYTES // 16, 25_000])
def test_a_sealed_copy_is_read_back_whole_and_keyed_by_content(
    store: Any, app: App, items: int
) -> None:
    value = np.arange(float(items))
    reference, sealing = _kept(store, app.signer, value)
    assert all(part.sealed for part in reference.layout if part.digest)
    loaded = reference.load(store.get_blob, app.signer)
    assert np.array_equal(loaded, value)
    loaded[0] = -1.0  # writable, as it was on the worker
    # The key it would have had unsealed: what tells that a cell changed it in place.
    assert sealing.content_key() == key_of(value) != reference.key


def test_a_value_kept_sealed_twice_shares_no_blob(store: Any, app: App) -> None:
    value = np.arange(30_000.0)
    first, _ = _kept(store, app.signer, value)
    second, _ = _kept(store, app.signer, value)
    assert not set(first.blob_sizes) & set(second.blob_sizes)
    store.release_blobs({first.keeper: first.blob_sizes})
    assert np.array_equal(second.load(store.get_blob, app.signer), value)


def test_a_released_sealed_copy_leaves_nothing_behind(
    store: Any, app: App, access: RawBroker
) -> None:
    reference, _ = _kept(store, app.signer, np.arange(30_000.0))
    assert store.has_blobs(reference.blob_sizes)
    assert store.release_blobs({reference.keeper: reference.blob_sizes}) == list(
        reference.blob_sizes
    )
    prefix = access.settings.key_prefix
    assert not list(access.store.scan_iter(match=f"{prefix}:blob*"))
    if store.local_blobs is not None:
        assert not list(store.local_blobs.directory.iterdir())


def _refused(reference: RemoteValue, store: Any, signer: Signer | None) -> None:
    Loaded.LOADS.clear()
    with pytest.raises(BlobError, match=r"does not match its seal|nothing was given"):
        reference.load(store.get_blob, signer)
    assert Loaded.LOADS == [], "a blob that does not match its seal was unpickled"


def test_a_sealed_blob_altered_in_the_store_is_refused_before_unpickling(
    store: Any, app: App, access: RawBroker
) -> None:
    reference, _ = _kept(store, app.signer, Loaded(np.arange(30_000.0)))
    ((name, size),) = reference.blob_sizes.items()
    stored = bytearray(_stored(store, name, size))
    stored[1000] ^= 0xFF
    _replace(store, access, name, size, bytes(stored))
    _refused(reference, store, app.signer)


def test_a_blob_sealed_with_another_secret_or_unchecked_is_refused(store: Any, app: App) -> None:
    reference, _ = _kept(store, Signer("another secret"), Loaded(np.arange(30_000.0)))
    _refused(reference, store, app.signer)
    mine, _ = _kept(store, app.signer, Loaded(np.arange(30_000.0)))
    _refused(mine, store, None)  # nothing to check the seal with: nothing is loaded


def test_a_sealed_blob_moved_under_another_id_is_refused(
    store: Any, app: App, access: RawBroker
) -> None:
    # Both sealed with the right secret: the seal names the blob's id, so a copy of
    # one value's blob put in place of another's is not that other's.
    first, _ = _kept(store, app.signer, Loaded(np.arange(30_000.0)))
    second, _ = _kept(store, app.signer, Loaded(np.arange(30_000.0) * 2))
    ((name, size),) = first.blob_sizes.items()
    ((other, other_size),) = second.blob_sizes.items()
    assert size == other_size
    _replace(store, access, other, size, _stored(store, name, size))
    _refused(second, store, app.signer)


def test_a_truncated_sealed_blob_is_refused(app: App) -> None:
    data = bytes(range(256)) * 400
    with pytest.raises(BlobError, match="does not match its seal"):
        open_sealed(app.signer, "a" * 64, len(data), data + b"\x00" * (SEAL_BYTES - 1))
