"""Large blobs on one host are written to their shared file while they are hashed.

A blob larger than one hashing piece (8 MiB) is written piece by piece as it is hashed,
under a private name, and renamed to its digest by ``put`` (after the store noted its
use); the same blob sent again while its file is kept is hashed, not written again.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ROOT

from nbtask.brokers.local_blobs import LocalBlobs
from nbtask.wire.blobs import SplitValue, digest_of, split_value

PIECE = 8 * 1024 * 1024
LARGE = 20 * 1024 * 1024  # three pieces


def _large(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(LARGE // 8)


def _local(directory: Path) -> LocalBlobs:
    directory.mkdir(mode=0o700, exist_ok=True)
    return LocalBlobs(directory, 3600)


def _send(blobs: LocalBlobs, value: Any) -> str:
    """Split ``value`` as a message would, writing through ``blobs``: its one blob's digest."""
    split: SplitValue = split_value(value, 0, blobs.stage)
    blobs.put(split.blobs)
    (digest,) = split.blobs
    return digest


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobs:
    return _local(tmp_path / "blobs")


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The offsets of the pieces written to a blob file (``os.pwrite``, still called)."""
    offsets: list[int] = []
    pwrite = os.pwrite

    def counted(fd: int, data: Any, offset: int) -> int:
        offsets.append(offset)
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counted)
    return offsets


def _names(blobs: LocalBlobs) -> list[str]:
    return sorted(path.name for path in blobs.directory.iterdir())


def test_a_blob_written_while_hashed_is_the_file_put_alone_writes(
    blobs: LocalBlobs, tmp_path: Path, writes: list[int]
) -> None:
    array = _large(1)
    digest = _send(blobs, array)
    assert sorted(writes) == [0, PIECE, 2 * PIECE]  # while hashed, not by put
    plain = _local(tmp_path / "plain")
    plain.put(split_value(array, 0).blobs)
    assert _names(blobs) == _names(plain) == [digest_of(array)] == [digest]
    assert (blobs.directory / digest).read_bytes() == array.tobytes()


def test_the_same_blob_sent_again_while_kept_is_not_written_again(
    blobs: LocalBlobs, writes: list[int]
) -> None:
    array = _large(2)
    digest = _send(blobs, array)
    inode = (blobs.directory / digest).stat().st_ino
    writes.clear()
    assert _send(blobs, array) == digest
    assert writes == []
    assert _names(blobs) == [digest] and (blobs.directory / digest).stat().st_ino == inode
    # Once its file is gone, the blob is written again, whole.
    blobs.remove(digest, lambda: False)
    assert _send(blobs, array) == digest
    assert sorted(writes) == [0, PIECE, 2 * PIECE]
    assert _names(blobs) == [digest]
    assert (blobs.directory / digest).read_bytes() == array.tobytes()


def test_a_blob_received_and_sent_back_is_not_written_again(
    blobs: LocalBlobs, tmp_path: Path, writes: list[int]
) -> None:
    array = _large(3)
    _local(blobs.directory).put(split_value(array, 0).blobs)  # another process's blob
    digest_of(memoryview(array))  # checked on arrival, as a worker does
    writes.clear()
    assert _send(blobs, array) == digest_of(array)
    assert writes == []
    assert _names(blobs) == [digest_of(array)]


def test_a_blob_with_one_piece_changed_is_written_whole(
    blobs: LocalBlobs, writes: list[int]
) -> None:
    array = _large(4)
    first = _send(blobs, array)
    array[-1] += 1.0  # in the last piece: the first two match the kept blob's
    writes.clear()
    second = _send(blobs, array)
    assert second != first and _names(blobs) == sorted([first, second])
    assert sorted(writes) == [0, PIECE, 2 * PIECE]  # the last while hashed, the others by put
    assert (blobs.directory / second).read_bytes() == array.tobytes()


def test_a_failed_write_leaves_neither_the_blob_nor_a_private_file(tmp_path: Path) -> None:
    # A real failure: the process may not write files over 12 MiB (EFBIG).
    directory = tmp_path / "blobs"
    script = f"""
import resource, signal
from pathlib import Path
import numpy as np
from nbtask.brokers.local_blobs import LocalBlobs
from nbtask.wire.blobs import split_value

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (12 * 1024 * 1024, resource.RLIM_INFINITY))
directory = Path({str(directory)!r})
directory.mkdir(mode=0o700)
blobs = LocalBlobs(directory, 3600)
split = split_value(np.random.default_rng(5).random({LARGE // 8}), 0, blobs.stage)
try:
    blobs.put(split.blobs)
except OSError as exc:
    print(exc.errno)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(errno.EFBIG)]
    assert list(directory.iterdir()) == []


def test_a_blob_set_aside_while_its_release_asks_the_store_is_still_read(
    tmp_path: Path,
) -> None:
    """A reader in the gap of ``remove`` (file set aside, store asked) finds the blob.

    Its use was noted before it was sent, so the store answers that the blob is needed and
    it goes back; the reader must not miss it meanwhile.
    """
    blobs = _local(tmp_path / "blobs")
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
