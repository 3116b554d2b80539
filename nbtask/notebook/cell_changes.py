"""What a cell changed, worker side: the names it bound, the shipped values it changed.

Whether a shipped value changed is told by a digest of its pickled state taken before and
after the cell (:func:`digests`), or by its key for a value kept on the workers.
:func:`effects` lists the names to send back; :func:`sent_objects` those of them bound to
a notebook object the cell was sent and left unchanged, which the notebook binds to its
own object rather than to a copy.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Container, Iterable, Mapping
from typing import Any

from nbtask.core.holding import key_of
from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.carried import may_change
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.shipping import CellSpec
from nbtask.notebook.worker_shell import BASE_NS
from nbtask.wire.blobs import Packed

__all__ = ["digest", "digests", "effects", "sent_objects", "state"]

_IPYTHON_NAMES = frozenset({"_exit_code"})  # besides the history names


def effects(
    namespace: Mapping[str, Any],
    shipped: Mapping[str, Any],
    before: Mapping[str, bytes],
    spec: CellSpec,
    references: Mapping[str, RemoteValue],
    *,
    failed: bool = False,
) -> dict[str, Any]:
    """The names the cell bound or changed, and those it deleted.

    ``{"out": {name: value}, "deleted": [name], "sent": {name: shipped name}}``, ``sent``
    of :func:`sent_objects` (the names of ``out`` the notebook binds to its own objects)
    if the kernel does (``spec.binds_sent``) and the cell did not fail: a failed cell's
    names may be bound once the notebook holds no longer what it sent.
    """
    out: dict[str, Any] = {}
    for name, value in namespace.items():
        if name in BASE_NS and BASE_NS[name] is value:
            continue
        # Read, not rebound: send it back only if its pickled state changed.
        unchanged = name not in before or state(name, value, references) == before[name]
        if name in shipped and value is shipped[name] and name not in spec.assigned and unchanged:
            continue
        if name in _IPYTHON_NAMES or is_history_name(name):
            continue
        out[name] = value
    # A name the cell deleted, shipped or bound here first; "" from an older kernel.
    maybe_deleted = dict.fromkeys([*shipped, *getattr(spec, "deleted", ())])
    deleted = [n for n in maybe_deleted if n not in namespace]
    sent: dict[str, str] = {}
    if getattr(spec, "binds_sent", False) and not failed:  # False: an older kernel
        names = [n for n in spec.names if n not in references]
        sent = sent_objects(out, shipped, names, before, namespace)
    return {"out": out, "deleted": deleted, "sent": sent}


def sent_objects(
    out: Mapping[str, Any],
    shipped: Mapping[str, Any],
    names: Iterable[str],
    before: Mapping[str, bytes],
    namespace: Mapping[str, Any],
) -> dict[str, str]:
    """The names in ``out`` bound to a notebook object the cell was sent and left unchanged.

    ``{name: shipped name}`` (``alias = small``: ``{"alias": "small"}``), of the shipped
    ``names``: the notebook binds each to the object it sent under the shipped name, so
    that ``alias is small`` holds there as locally, and nothing is sent back (nor kept on
    the workers) for it. An object the cell changed in place comes back as a value, and
    is written into the notebook's own (:mod:`nbtask.notebook.inplace`).
    """
    sent = {id(shipped[n]): n for n in names}
    unchanged: dict[str, bool] = {}
    found: dict[str, str] = {}
    for name, value in out.items():
        source = sent.get(id(value))
        if source is None:
            continue
        if source not in unchanged:
            # Still bound to its name and not sent back: the cell's check found it unchanged.
            bound = source not in out and namespace.get(source) is value
            same = bound or source not in before or digest(value) == before[source]
            unchanged[source] = same
        if unchanged[source]:
            found[name] = source
    return found


def digests(values: Mapping[str, Any], skip: Container[str] = ()) -> dict[str, bytes]:
    """The digests of the values a cell may change in place, but those named in ``skip``."""
    return {n: digest(v) for n, v in values.items() if may_change(v) and n not in skip}


def state(name: str, value: Any, references: Mapping[str, RemoteValue]) -> bytes:
    """What tells whether a shipped value changed: its key if it came as a kept value."""
    return key_of(value).encode() if name in references else digest(value)


def digest(value: Any) -> bytes:
    """A digest of a value's pickled state, its buffers hashed where they are (no copy).

    A function's state is its attributes (``f.calls += 1``): its code does not change, and
    its globals are values of their own.
    """
    if isinstance(value, types.FunctionType):
        value = vars(value)
    try:
        packed = Packed.of(value)
    except Exception:
        return b""
    hashed = hashlib.blake2b(packed.stream, digest_size=16)
    for buffer in packed.buffers:
        hashed.update(buffer)
    return hashed.digest()
