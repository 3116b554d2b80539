"""Blobs through shared memory, for clients and workers on one host.

When every process that shares a store runs on one machine (the embedded cluster, or any
Redis reached through a unix socket; elsewhere ``blob_dir`` says so), a blob need not go
through Redis at all: it is written once to a file in a private directory on a memory
filesystem (``/dev/shm``), and a reader maps that file copy-on-write, so an array rebuilt
on it is writable and costs no copy until it is written to. The bytes are still checked
against their signed digest before anything is unpickled.

Files are named by digest (a blob already there is not written again, only touched), and
removed once older than ``result_ttl``, or with the whole directory when the embedded
cluster stops, or earlier when the store says no use needs the blob any more
(:mod:`nbtask.brokers.redis_blobs` keeps each blob's uses).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from nbtask.settings import Settings
from nbtask.wire.envelope import Buffer

__all__ = ["LocalBlobs", "Stored", "local_blob_dir", "pieces", "remove_local_blobs"]

log = logging.getLogger(__name__)

_SHARED_MEMORY = Path("/dev/shm")
_SWEEP_EVERY_SECONDS = 60.0
#: What is written for a blob: its bytes, or its pieces end to end (a sealed blob's bytes,
#: then its seal).
Stored = Buffer | tuple[Buffer, ...]


def pieces(data: Stored) -> Sequence[Buffer]:
    """The pieces written, in order, for a blob's ``data``."""
    return data if isinstance(data, tuple) else (data,)


def local_blob_dir(url: str, settings: Settings) -> Path | None:
    """Where blobs go on this host: ``settings.blob_dir``, else one per unix-socket store.

    ``None`` when blobs must go through the store (a store reached over TCP, on no
    host in particular, or a machine without ``/dev/shm``).
    """
    if settings.blob_dir:
        return Path(settings.blob_dir)
    return _socket_blob_dir(url)


def _socket_blob_dir(url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme != "unix" or not _SHARED_MEMORY.is_dir():
        return None
    name = hashlib.sha256(parts.path.encode()).hexdigest()[:24]
    return _SHARED_MEMORY / f"nbtask-blobs-{name}"


def remove_local_blobs(url: str) -> None:
    """Delete the blobs kept on this host for the unix-socket store at ``url``."""
    directory = _socket_blob_dir(url)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class LocalBlobs:
    """Blobs as files in one private directory on this host.

    Parameters
    ----------
    directory
        Created (mode 0700) if missing; refused if another user owns it or others may
        write to it.
    ttl
        Seconds a blob is kept after it was last written or touched.
    """

    def __init__(self, directory: Path, ttl: float) -> None:
        self.directory = directory
        self.ttl = ttl
        self._swept = 0.0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, settings: Settings) -> LocalBlobs | None:
        """The local blobs for a store at ``url``, or ``None`` (blobs go to the store)."""
        directory = local_blob_dir(url, settings)
        if directory is None:
            return None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
        except OSError as exc:
            log.warning("blobs go through the store: cannot use %s (%s)", directory, exc)
            return None
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning(
                "blobs go through the store: %s belongs to another user or others may write to it",
                directory,
            )
            return None
        return cls(directory, settings.result_ttl)

    def put(self, blobs: Mapping[str, Stored]) -> dict[str, Stored]:
        """Write each blob not already here (touching those that are).

        Returns the blobs there was no room for (the directory's filesystem is full),
        which must go through the store instead; one log line says so.
        """
        no_room: dict[str, Stored] = {}
        for digest, data in blobs.items():
            path = self.directory / digest
            try:
                os.utime(path)
                continue
            except FileNotFoundError:
                pass
            # Written under a private name, then renamed: a reader never sees half a blob.
            partial = self.directory / f".{digest}.{os.getpid()}.{threading.get_ident()}"
            try:
                with open(partial, "wb") as file:
                    for piece in pieces(data):
                        file.write(piece)
            except OSError as exc:
                partial.unlink(missing_ok=True)  # half a blob would fill it for everyone
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                no_room[digest] = data
                continue
            os.replace(partial, path)
        if no_room:
            size = sum(memoryview(p).nbytes for d in no_room.values() for p in pieces(d))
            log.warning(
                "no room for %s bytes of large values in %s (its filesystem is full): they "
                "go through the store instead; free space there, or set NBTASK_BLOB_DIR to a "
                "larger directory",
                f"{size:,}",
                self.directory,
            )
        self._sweep()
        return no_room

    def touch(self, digests: Iterable[str]) -> None:
        """Restart the TTL of the blobs here (missing ones are left missing)."""
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.directory / digest)

    def remove(self, digest: str, in_use: Callable[[], bool]) -> None:
        """Delete a blob the store said no use needs, unless ``in_use()`` says one came since.

        A writer notes its use before it looks for the file, so the file is first set
        aside, then the store is asked again: a writer that found it meanwhile (and so
        did not write it) gets it back.
        """
        aside = self.directory / f"{_aside(digest)}{os.getpid()}.{threading.get_ident()}"
        try:
            os.rename(self.directory / digest, aside)
        except FileNotFoundError:
            return
        needed = True  # if the store cannot be asked, the blob stays (until the TTL)
        try:
            needed = in_use()
        finally:
            if needed:
                os.replace(aside, self.directory / digest)
            else:
                os.unlink(aside)

    def has(self, digest: str, size: int) -> bool:
        """Whether :meth:`get` would find the blob (here, of that size)."""
        try:
            return size > 0 and (self.directory / digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def get(self, digest: str, size: int) -> Buffer | None:
        """The blob mapped copy-on-write, or ``None`` if it is not here (or not that size).

        A blob :meth:`remove` has just set aside is read there: it is given back if the
        reader's use was noted (every reader's was), and a mapped file outlives its name.
        """
        try:
            return _mapped(self.directory / digest, size)
        except FileNotFoundError:
            pass
        for aside in self.directory.glob(f"{_aside(digest)}*"):
            with contextlib.suppress(FileNotFoundError):
                return _mapped(aside, size)
        return None

    def _sweep(self) -> None:
        """Remove blobs older than the TTL, at most once a minute."""
        now = time.time()
        with self._lock:
            if now - self._swept < _SWEEP_EVERY_SECONDS:
                return
            self._swept = now
        for entry in os.scandir(self.directory):
            try:
                if entry.stat().st_mtime < now - self.ttl:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue


def _aside(digest: str) -> str:
    """How the names of a blob's files that :meth:`LocalBlobs.remove` set aside begin."""
    return f".{digest}.gone."


def _mapped(path: Path, size: int) -> Buffer | None:
    """The file at ``path`` mapped copy-on-write, or ``None`` if it is not ``size`` bytes."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size != size or size == 0:
            return None
        return memoryview(mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY))
