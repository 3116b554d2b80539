"""Large values out of band: a pickled value split into parts, the big ones sent as blobs.

A value is pickled with protocol 5, and every buffer of at least :data:`MIN_BLOB_BYTES`
that it exposes (numpy arrays, pandas columns, ``bytes`` wrapped in a
:class:`pickle.PickleBuffer`) is kept out of the pickle stream, uncopied. When the parts
add up to ``threshold`` bytes or more, each big part (the pickle stream included, a large
list say) travels as a **blob** named by its BLAKE3 digest; the others stay inline, in the
message body. The layout, a list of ``[size]`` (inline) or ``[size, digest]`` (blob) items,
travels in the signed header, so a blob is trusted only if its bytes hash to the digest that
the signature covers, and it is checked before anything is unpickled.

Blobs are content-addressed: the same array sent twice is stored once. Where they are kept
(the store, shared memory) is the broker layer's business; this module only needs a
function that returns a blob's bytes by digest.

One kind of blob is not: a kept value that its worker process holds live, whose store copy
is written after the cell ended (:mod:`nbtask.brokers.later_writes`), is **sealed**
(``split_value(..., sealed=True)``). Hashing hundreds of megabytes would take longer than
the cell, so its blobs are named by random ids, and the background writer hashes each one
and stores it followed by a seal: the HMAC, with the app's secret, of its id, size and
digest (:func:`seal_blob`). A reader checks the seal against the bytes' digest before
anything is unpickled (:func:`open_sealed`), so a blob altered or swapped in the store is
refused as a content-addressed one is. A value kept sealed shares no blob with another
copy of the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pickle
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import cloudpickle
from blake3 import blake3

from nbtask.errors import BlobError, DecodeError
from nbtask.wire.envelope import Buffer, Pickler, Signer
from nbtask.wire.item_loads import load_items

__all__ = [
    "MIN_BLOB_BYTES",
    "SEAL_BYTES",
    "BlobReader",
    "ByteProgress",
    "Fetch",
    "Packed",
    "Part",
    "SplitValue",
    "argument_keeper",
    "blob_sizes",
    "content_layout",
    "digest_of",
    "join_value",
    "open_sealed",
    "parse_layout",
    "seal_blob",
    "split_value",
]

#: Buffers smaller than this stay inside the pickle stream, and parts smaller than this
#: stay inline: a blob costs a store round trip of its own.
MIN_BLOB_BYTES = 64 * 1024
_DIGEST_CHARS = 64  # hex BLAKE3, 256 bits
_MAX_PARTS = 100_000
#: The seal stored after a sealed blob's bytes (an HMAC-SHA256).
SEAL_BYTES = 32

#: Returns a blob's bytes from its digest and size (raises :class:`BlobError` if gone).
Fetch = Callable[[str, int], Buffer]
#: Told how many more bytes of a value arrived, as they arrive.
ByteProgress = Callable[[int], None]


class BlobReader(Protocol):
    """A store's ``get_blob``: a :data:`Fetch` that can tell ``progress`` as bytes arrive."""

    def __call__(self, digest: str, size: int, progress: ByteProgress | None = None) -> Buffer:
        """The blob's bytes; raises :class:`~nbtask.errors.BlobError` if it is gone."""


def digest_of(data: Buffer) -> str:
    """The name of a blob: the hex BLAKE3 of its bytes, or of its pieces' digests.

    BLAKE3, not SHA-256: a 256-bit cryptographic hash about four times as fast on one
    core (50 MB in 9 ms against 35 ms on an x86 core with SHA extensions), and a large
    value is hashed twice, by its sender to name it and by its reader to check it. Up to
    :data:`_PIECE_BYTES` it is the BLAKE3 of the bytes. A larger blob is hashed in pieces
    of that size on a few threads (the hash releases the GIL), and named by the BLAKE3 of
    a label and the pieces' digests in order: a different bytes string still needs a
    BLAKE3 collision to share a name. The threads are this module's own, not the BLAKE3
    library's (whose pool does not survive a fork), so a forked worker child hashes safely.
    """
    view = memoryview(data).cast("B")
    if view.nbytes <= _PIECE_BYTES:
        return blake3(view).hexdigest()
    pieces = [view[i : i + _PIECE_BYTES] for i in range(0, view.nbytes, _PIECE_BYTES)]
    digests = _hashing_pool().map(_piece_digest, pieces)
    return blake3(b"nbtask pieces\x00" + b"".join(digests)).hexdigest()


_PIECE_BYTES = 8 * 1024 * 1024
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []


def _piece_digest(piece: memoryview) -> bytes:
    return blake3(piece).digest()


def _hashing_pool() -> concurrent.futures.ThreadPoolExecutor:
    if not _POOL:
        threads = min(4, os.cpu_count() or 1)
        _POOL.append(concurrent.futures.ThreadPoolExecutor(threads, "nbtask-hash"))
    return _POOL[0]


# A forked process (a worker's child) has none of its parent's threads: it makes its own.
os.register_at_fork(after_in_child=_POOL.clear)


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a split value: ``size`` bytes, inline or (with a ``digest``) a blob.

    A ``sealed`` blob's ``digest`` is a random id: its bytes are checked against the seal
    stored after them (:func:`open_sealed`).
    """

    size: int
    digest: str | None = None
    sealed: bool = False

    def to_json(self) -> list[int | str]:
        """The layout item: ``[size]``, ``[size, digest]`` or ``[size, id, 1]`` (sealed)."""
        if self.digest is None:
            return [self.size]
        return [self.size, self.digest, 1] if self.sealed else [self.size, self.digest]

    @property
    def stored_size(self) -> int:
        """The bytes the blob takes in the store: a sealed one's seal follows them."""
        return self.size + SEAL_BYTES if self.sealed else self.size


@dataclasses.dataclass
class SplitValue:
    """A pickled value in parts: what goes inline, what goes out as blobs, and the layout.

    ``inline`` is in layout order; ``blobs`` maps each blob's digest to its bytes (a
    value holding the same buffer twice sends it once).
    """

    layout: list[Part]
    inline: list[Buffer]
    blobs: dict[str, Buffer]

    @property
    def layout_json(self) -> list[list[int | str]] | None:
        """The header's layout; ``None`` for a plain pickle (one inline part)."""
        if len(self.layout) == 1 and self.layout[0].digest is None:
            return None
        return [part.to_json() for part in self.layout]

    @property
    def size(self) -> int:
        """The value's pickled size, all parts together."""
        return sum(part.size for part in self.layout)


def _pickle_parts(
    value: Any, persistent_id: Callable[[Any], Any] | None = None
) -> tuple[memoryview, list[memoryview]]:
    """``value`` pickled (cloudpickle, protocol 5): its stream, and its big buffers uncopied.

    ``persistent_id``: as :meth:`pickle.Pickler.persistent_id` (objects named, not pickled).
    """
    buffers: list[memoryview] = []

    def keep_out(buffer: pickle.PickleBuffer) -> bool:
        # False means "out of band". Non-contiguous buffers cannot be viewed as bytes.
        try:
            raw = buffer.raw()
        except BufferError:
            return True
        if raw.nbytes < MIN_BLOB_BYTES:
            return True
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    pickler = Pickler(stream, protocol=5, buffer_callback=keep_out)
    if persistent_id is not None:
        pickler.persistent_id = persistent_id
    pickler.dump(value)
    return stream.getbuffer(), buffers


def split_value(value: Any, threshold: int, *, sealed: bool = False) -> SplitValue:
    """Pickle ``value`` (cloudpickle, protocol 5) and split it for sending.

    ``sealed``: its blobs are named by random ids, not hashed (their writer seals them:
    :func:`seal_blob`). Raises whatever pickling raises: the caller says what could not
    be pickled.
    """
    stream, buffers = _pickle_parts(value)
    parts: list[Buffer] = [stream, *buffers]
    as_blobs = sum(len(p) for p in parts) >= threshold
    layout: list[Part] = []
    inline: list[Buffer] = []
    blobs: dict[str, Buffer] = {}
    for data in parts:
        if as_blobs and len(data) >= MIN_BLOB_BYTES:
            digest = secrets.token_hex(32) if sealed else digest_of(data)
            blobs.setdefault(digest, data)
            layout.append(Part(len(data), digest, sealed))
        else:
            inline.append(data)
            layout.append(Part(len(data)))
    return SplitValue(layout, inline, blobs)


class Packed:
    """A value pickled ahead of sending, whose big buffers stay out of band, uncopied.

    Pickling a ``Packed`` (protocol 5) hands its buffers to the outer pickler as
    out-of-band buffers, so a cell's shipped variables, pickled once to check them, travel
    as blobs without another copy. :meth:`load` unpickles the value on the other side.
    """

    __slots__ = ("buffers", "stream")

    def __init__(self, stream: Buffer, buffers: Sequence[Buffer] = ()) -> None:
        self.stream = stream
        self.buffers = list(buffers)

    @classmethod
    def of(cls, value: Any, persistent_id: Callable[[Any], Any] | None = None) -> Packed:
        """Pickle ``value``; raises whatever pickling raises.

        ``persistent_id``: what names an object the other side has already, instead of
        pickling it (:meth:`pickle.Pickler.persistent_id`); :meth:`load` is then given
        what finds it there.
        """
        stream, buffers = _pickle_parts(value, persistent_id)
        return cls(bytes(stream), buffers)

    @property
    def size(self) -> int:
        """The pickled size, buffers included."""
        return len(self.stream) + sum(memoryview(b).nbytes for b in self.buffers)

    def load(self, persistent_load: Callable[[Any], Any] | None = None) -> Any:
        """The value (only call on a ``Packed`` that came in a verified message).

        ``persistent_load``: the object each persistent id the value was pickled with
        names (:meth:`pickle.Unpickler.persistent_load`).
        """
        buffers = [_writable(b) for b in self.buffers]
        if persistent_load is None:
            return pickle.loads(self.stream, buffers=buffers)
        return _Unpickler(io.BytesIO(self.stream), buffers, persistent_load).load()

    def load_items(
        self, persistent_load: Callable[[Any], Any] | None = None
    ) -> tuple[dict[Any, Any], dict[Any, Exception]]:
        """A pickled dict's items that load, and the error of each other.

        Slower than :meth:`load`: for a dict that does not load whole (see
        :mod:`.item_loads`).
        """
        buffers = [_writable(b) for b in self.buffers]
        return load_items(bytes(self.stream), buffers, persistent_load)

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        buffers = [pickle.PickleBuffer(b) for b in self.buffers]
        return (_unpack, (self.stream, *buffers))


class _Unpickler(pickle.Unpickler):
    """An unpickler that finds what persistent ids name through ``find``."""

    def __init__(
        self, file: io.BytesIO, buffers: Sequence[Buffer], find: Callable[[Any], Any]
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._find = find

    def persistent_load(self, pid: Any) -> Any:
        return self._find(pid)


def _unpack(stream: Buffer, *buffers: Buffer) -> Packed:
    return Packed(stream, buffers)


def parse_layout(raw: object) -> list[Part] | None:
    """A layout read from a verified header; ``None`` when absent.

    Raises
    ------
    DecodeError
        It is not a list of ``[size]`` / ``[size, digest]`` items.
    """
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or len(raw) > _MAX_PARTS:
        raise DecodeError("the value layout is not a non-empty list")
    layout = []
    for item in raw:
        if not isinstance(item, list) or len(item) not in (1, 2):
            raise DecodeError("a value layout item is not [size] or [size, digest]")
        size = item[0]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DecodeError("a value layout item has a bad size")
        digest = item[1] if len(item) == 2 else None
        if digest is not None and (
            not isinstance(digest, str)
            or len(digest) != _DIGEST_CHARS
            or digest.strip("0123456789abcdef")
        ):
            raise DecodeError("a value layout item has a bad digest")
        layout.append(Part(size, digest))
    return layout


def blob_sizes(layout: Sequence[Part] | None) -> dict[str, int]:
    """``{digest: size}`` of the blobs a layout names, as stored (none for a plain pickle)."""
    return {part.digest: part.stored_size for part in layout or () if part.digest is not None}


def content_layout(layout: Sequence[Part], digests: Mapping[str, str]) -> list[Part]:
    """``layout`` with its sealed blobs named by content, ``digests`` ``{id: digest}``.

    What the value would have been kept as unsealed (the key that tells it changed).
    """
    return [
        Part(part.size, digests[part.digest]) if part.sealed and part.digest else part
        for part in layout
    ]


def _seal_label(name: str, size: int, digest: str) -> bytes:
    return f"sealed blob {name} {size} {digest}".encode()


def seal_blob(signer: Signer, name: str, data: Buffer) -> tuple[str, bytes]:
    """Hash the blob ``name``'s bytes; return their digest and the seal stored after them."""
    digest = digest_of(data)
    return digest, signer.tag(_seal_label(name, len(data), digest))


def open_sealed(
    signer: Signer | None, name: str, size: int, stored: Buffer
) -> tuple[memoryview, str]:
    """A sealed blob's ``size`` bytes and their digest, once its seal checks.

    ``stored``: what the store held, the bytes followed by their seal.

    Raises
    ------
    BlobError
        No seal, or one that is not the HMAC of these bytes' digest under the id and size.
    """
    view = memoryview(stored).cast("B")
    if signer is None:
        raise BlobError(f"blob {name[:16]} is sealed, and nothing was given to check its seal")
    digest = digest_of(view[:size]) if view.nbytes == size + SEAL_BYTES else ""
    if not digest or not signer.check_tag(_seal_label(name, size, digest), view[size:]):
        raise BlobError(
            f"blob {name[:16]} does not match its seal (it was altered, truncated or "
            "swapped in the store, or sealed with another secret); nothing was loaded"
        )
    return view[:size], digest


def argument_keeper(task_id: str) -> str:
    """The use a task's argument blobs are noted under, until the task has ended.

    Its prefix keeps it apart from a kept value's keeper (random hex), and the task id
    makes it the same for every delivery and retry of the task.
    """
    return f"args:{task_id}"


def join_value(
    layout: Sequence[Part] | None,
    region: Buffer,
    fetch: Fetch | None,
    signer: Signer | None = None,
    digests: dict[str, str] | None = None,
) -> Any:
    """Load a value from its inline ``region`` and its blobs; only for verified messages.

    Every blob is fetched and checked against its signed digest (a sealed one against its
    seal, with ``signer``; ``digests``, if given, is filled with the sealed blobs' digests)
    before anything is unpickled. Buffers come back writable, as they were on the sending
    side.

    Raises
    ------
    BlobError
        A blob is missing, expired, or its bytes do not match its digest.
    DecodeError
        The inline parts do not add up to the region.
    """
    if layout is None:
        return cloudpickle.loads(region) if len(region) else None
    parts = _gather(layout, memoryview(region), fetch, signer, {} if digests is None else digests)
    return pickle.loads(parts[0], buffers=[_writable(p) for p in parts[1:]])


def _gather(
    layout: Sequence[Part],
    region: memoryview,
    fetch: Fetch | None,
    signer: Signer | None,
    digests: dict[str, str],
) -> list[Buffer]:
    offset = 0
    parts: list[Buffer] = []
    for part in layout:
        if part.digest is None:
            parts.append(region[offset : offset + part.size])
            offset += part.size
            continue
        if fetch is None:
            raise BlobError("the value is kept out of band, and no store was given to fetch it")
        if part.sealed:
            stored = fetch(part.digest, part.stored_size)
            opened, digests[part.digest] = open_sealed(signer, part.digest, part.size, stored)
            parts.append(opened)
            continue
        data = fetch(part.digest, part.size)
        if len(data) != part.size or digest_of(data) != part.digest:
            raise BlobError(
                f"blob {part.digest[:16]} does not match its signed digest (it was altered "
                "or truncated in the store); nothing was loaded"
            )
        parts.append(data)
    if offset != len(region):
        raise DecodeError("the value's inline parts do not add up to its region")
    return parts


def _writable(data: Buffer) -> Buffer:
    """``data`` as a writable buffer (an array rebuilt on it must accept assignment)."""
    if isinstance(data, bytearray):
        return data
    view = memoryview(data)
    return view if not view.readonly else bytearray(view)
