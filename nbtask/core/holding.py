"""Values a worker process holds live in memory, so later work on them starts at once.

A ``%%task`` cell that keeps a large name leaves its store copy (blobs) and also this
process's live object. Every worker process consumes a queue of its own,
:func:`holder_queue`, beside the shared ones: a later cell that reads the kept value is sent
there while the process lives, and finds the object here without reading a blob.

The memory is bounded by ``worker_memory_budget``: past it, the least recently used values
are dropped from memory. That is the spill: their store copy remains (until
``result_ttl``), so a later cell that reads one loads it from the store again.

A value is also dropped once no one can name it any more. A notebook session that ends
releases what it kept, but a kernel killed (SIGKILL, the OOM killer, a crashed machine)
sends no release. So each held value notes its *namers*: the session whose cell kept, loaded
or used it (:func:`session_namer`, by its client channel), and its keeper id
(:func:`keeper_namer`, one per kept value). A live session marks its own namer and its kept
values' keepers in the store every :func:`naming_interval`, for ``result_ttl``, however long
it sits idle (a restarted kernel that re-attached a value tracks its keeper too). A value
none of whose namers is marked, and that no work used for ``result_ttl``, is one no live
session names and no re-attach can reach (the records that name it went after
``result_ttl`` too): the holder drops it (:meth:`Holding.drop_unnamed`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from nbtask.wire.blobs import Packed, Part, split_value

__all__ = [
    "HeldValue",
    "Holding",
    "holder_queue",
    "is_holder_queue",
    "keeper_namer",
    "key_of",
    "naming_interval",
    "session_namer",
    "size_of",
    "value_key",
]

log = logging.getLogger("nbtask.worker")

_HOLDER_PREFIX = "held."
#: The longest between two marks of a live session (and two looks of a holder).
_NAMING_SECONDS = 300.0


def session_namer(client: str) -> str:
    """The namer of the values a session's cells kept, loaded or used (its client channel)."""
    return f"s:{client}"


def keeper_namer(keeper: str) -> str:
    """The namer of one kept value, whichever session references it (its keeper id)."""
    return f"k:{keeper}"


def naming_interval(result_ttl: float) -> float:
    """Seconds between a live session's marks, and between a holder's looks at them.

    A quarter of ``result_ttl`` (the marks' lifetime), at most five minutes: a mark is
    renewed well before it lapses, at a rate that costs the store nothing.
    """
    return min(result_ttl / 4, _NAMING_SECONDS)


def holder_queue(consumer: str) -> str:
    """The queue only the worker process serving as ``consumer`` takes messages from."""
    return f"{_HOLDER_PREFIX}{consumer}"


def is_holder_queue(queue: str) -> bool:
    """Whether ``queue`` is one worker process's own (see :func:`holder_queue`)."""
    return queue.startswith(_HOLDER_PREFIX)


def value_key(layout: Sequence[Part], inline: bytes, keeper: str = "") -> str:
    """A kept value's key in a holding: a digest of its layout, inline bytes and keeper id.

    Without ``keeper``, its key by content (what :func:`key_of` gives it). With it, two
    values kept apart with the same bytes (``seen = []``, ``errors = []``) are held apart:
    two objects, as they were where they were made, so changing one leaves the other as it
    was. Names bound to one kept value (``alias = x``) share its keeper, and so one object.
    """
    text = json.dumps([part.to_json() for part in layout]).encode()
    extra = b"\x00" + keeper.encode() if keeper else b""
    return hashlib.sha256(text + b"\x00" + inline + extra).hexdigest()


def key_of(value: Any) -> str:
    """The key keeping ``value`` now would give it ("" if it cannot be pickled).

    One pass of the (threaded) blob digests over its buffers: how a worker tells that a
    value it holds was changed in place.
    """
    try:
        split = split_value(Packed.of(value), threshold=0)
    except Exception:
        return ""
    return value_key(split.layout, b"".join(bytes(part) for part in split.inline))


def size_of(value: Any) -> int:
    """About how many bytes ``value`` takes in memory (a dataset's size, for status)."""
    try:
        usage = getattr(value, "memory_usage", None)  # a DataFrame: its columns' buffers
        if callable(usage) and hasattr(value, "columns"):
            return int(usage(deep=False).sum())
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            return nbytes
        return sys.getsizeof(value)
    except Exception:
        return 0


@dataclasses.dataclass
class HeldValue:
    """One value held live: what the notebook calls it, its size, and the cell that made it."""

    value: Any
    name: str
    size: int
    made_by: str
    #: Given to a function task as it is: it may have been changed in place since.
    lent: bool = False
    #: Its key by content (what :func:`key_of` gives it unchanged): a sealed value's is
    #: known once its store copy was sealed ("" before); ``None``: its key is by content
    #: (held without a keeper id).
    content_key: Callable[[], str] | None = None
    #: Who can name it (:func:`session_namer`, :func:`keeper_namer`): while none of them is
    #: marked alive in the store, it is kept only ``result_ttl`` from its last use.
    namers: set[str] = dataclasses.field(default_factory=set)
    #: When it was last held or used (``time.monotonic()``).
    used: float = dataclasses.field(default_factory=time.monotonic)
    #: When a look first found none of its namers marked, of the looks in a row that did
    #: (``None``: the last look found one).
    unnamed_since: float | None = None

    def key_by_content(self, key: str) -> str:
        """What :func:`key_of` gives the value held under ``key`` while it is unchanged."""
        return key if self.content_key is None else self.content_key()


class Holding:
    """The live values of one worker process, by key, least recently used first out.

    Parameters
    ----------
    budget
        The most bytes held (sizes as pickled); 0 holds nothing.
    queue
        This process's own queue (:func:`holder_queue`): where work on its values goes.
    on_change
        Called with the held values after each change (to announce them in the registry).
    before_use
        Called before a held value is handed out, to wait for the store copies this
        process still writes in the background: they are read from the live buffers,
        which the work given the value may change in place.
    """

    def __init__(
        self,
        budget: int,
        queue: str = "",
        on_change: Callable[[list[HeldValue]], None] | None = None,
        before_use: Callable[[], object] | None = None,
    ) -> None:
        self.budget = budget
        self.queue = queue
        self._on_change = on_change
        self._before_use = before_use
        self._held: collections.OrderedDict[str, HeldValue] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: A value was held at some point: references naming this process exist.
        self.ever_held = False

    @property
    def total(self) -> int:
        """Bytes held now."""
        return sum(held.size for held in self._held.values())

    def get(self, key: str, namers: Iterable[str] = ()) -> HeldValue | None:
        """The value held under ``key`` (now the most recently used), or ``None``.

        ``namers``: who names it in the work it is handed to (they are noted with it).
        A value lent to a function task is checked first (one hash): if the task changed
        it in place, it no longer is what ``key`` names, and is dropped (its store copy
        still is). A value is handed out only once its store copy is written (see
        ``before_use``).
        """
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                held.used = time.monotonic()
                held.namers.update(namers)
        if held is not None and self._before_use is not None:
            self._before_use()
        if held is not None and held.lent:
            if key_of(held.value) != held.key_by_content(key):
                log.info("dropped %s from memory: a task changed it in place", held.name)
                self.drop(key)
                return None
            held.lent = False
        return held

    def lend(self, key: str) -> HeldValue | None:
        """Like :meth:`get`, for a function task, which gets the live object itself."""
        held = self.get(key)
        if held is not None:
            held.lent = True
        return held

    def hold(self, key: str, held: HeldValue) -> bool:
        """Hold ``held`` under ``key``, dropping the least recently used past the budget.

        A value larger than the whole budget is not held (False): its store copy serves it.
        """
        if held.size > self.budget:
            return False
        with self._lock:
            self.ever_held = True
            before = self._held.get(key)
            if before is not None:  # the same kept value held again: named by both
                held.namers.update(before.namers)
            self._held[key] = held
            self._held.move_to_end(key)
            total = sum(h.size for h in self._held.values())
            while total > self.budget:
                _, dropped = self._held.popitem(last=False)
                total -= dropped.size
                log.info(
                    "dropped %s (%d bytes) from memory: over worker_memory_budget; its "
                    "store copy remains",
                    dropped.name,
                    dropped.size,
                )
        self._changed()
        return True

    def drop(self, key: str) -> bool:
        """Stop holding ``key``; whether it was held."""
        with self._lock:
            found = self._held.pop(key, None) is not None
        if found:
            self._changed()
        return found

    def idle_namers(self, window: float, now: float) -> set[str]:
        """The namers of the values no work held or used in the ``window`` seconds to ``now``."""
        with self._lock:
            return {
                namer
                for held in self._held.values()
                if now - held.used >= window
                for namer in held.namers
            }

    def drop_unnamed(self, alive: Collection[str], window: float, now: float) -> list[HeldValue]:
        """Drop the values no live session names: none of their namers is in ``alive``.

        Only those no work held or used in the ``window`` seconds to ``now`` (``result_ttl``:
        a session killed since may yet be re-attached to them), with ``now`` the time
        :meth:`idle_namers` was asked at: a value used since, or first held since, stays
        whatever its namers. A value without namers (held for a reference made before
        namers existed) stays. Returns those dropped.

        A value is dropped only once its namers were found unmarked at looks spanning
        1.5 :func:`naming_interval` (three looks in a row): by then its store copy has
        expired too, so the holder may have the only copy, and a live session renews its
        marks every interval. A mark lost for a moment (a store that restarted empty, a
        key deleted) is renewed before then, and the value stays.
        """
        named = set(alive)
        patience = 1.5 * naming_interval(window)
        gone: dict[str, HeldValue] = {}
        with self._lock:
            for key, held in self._held.items():
                if not held.namers or now - held.used < window or held.namers & named:
                    held.unnamed_since = None
                elif held.unnamed_since is None or held.unnamed_since < held.used:
                    held.unnamed_since = now  # (used since the last such look: anew)
                elif now - held.unnamed_since >= patience:
                    gone[key] = held
            for key in gone:
                del self._held[key]
        if gone:
            self._changed()
        return list(gone.values())

    def values(self) -> list[HeldValue]:
        """The held values, least recently used first."""
        with self._lock:
            return list(self._held.values())

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.values())
        except Exception:  # the registry is for display only: never fail a task over it
            log.exception("could not announce the values this process holds")
