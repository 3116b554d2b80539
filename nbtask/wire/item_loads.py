"""A pickled dict loaded item by item: the values that load, and why each other did not.

A cell's values travel as one pickled ``{name: value}`` (names that share an object share
it on arrival). When that pickle does not load whole (one value's class exists only on
the workers, or its ``__setstate__`` raises here), :func:`load_items` loads it again with
the pure-Python unpickler, one item at a time: an item that raises is skipped to its end
in the stream, and the others load as they would have. An object the skipped item was
building, or never made, is unknown; a later item that holds it fails too
(:class:`SharedWithFailed`), rather than holding a half-built object. Only for a failure:
the C unpickler loads the usual dict whole.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import pickle
import pickletools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

__all__ = ["SharedWithFailed", "load_items"]


class SharedWithFailed(pickle.UnpicklingError):
    """An item holds an object that an item which could not be loaded was to make."""

    def __init__(self, name: Any) -> None:
        super().__init__(f"it shares an object with {name}, which did not come back")
        self.name = name


def load_items(
    stream: bytes,
    buffers: Sequence[Any],
    persistent_load: Callable[[Any], Any] | None = None,
) -> tuple[dict[Any, Any], dict[Any, Exception]]:
    """The items of the dict pickled in ``stream`` that load, and the error of each other.

    ``buffers``: its out-of-band buffers, in order; ``persistent_load``: as for
    :class:`pickle.Unpickler`. Only call on a stream from a verified message.

    Raises
    ------
    Exception
        The stream is not one pickled dict, or it failed outside any one item.
    """
    plain, items = _items_of(stream)
    unpickler = _ItemUnpickler(io.BytesIO(plain), buffers, items, persistent_load)
    loaded = unpickler.load()
    if not isinstance(loaded, dict):
        raise pickle.UnpicklingError("the stream is not one pickled dict")
    return loaded, unpickler.failed


@dataclasses.dataclass(frozen=True)
class _Item:
    """Where one value of the dict is in the (unframed) stream, and what it takes."""

    start: int
    end: int
    memoized: int  # how many objects it adds to the memo (MEMOIZE)
    put: frozenset[int]  # the memo indices it sets by number (PUT, BINPUT)
    buffers: int  # how many out-of-band buffers it takes
    alone: bool  # set by a SETITEM of its own (skipped with it), not in a SETITEMS batch


class _Lost:
    """What the memo holds for an object of an item that could not be loaded."""

    def __init__(self, name: Any) -> None:
        self.name = name


_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _items_of(stream: bytes) -> tuple[bytes, list[_Item]]:
    """The stream without its frames, and where each value of its top-level dict is.

    The stack is followed as :func:`pickletools.dis` does, each element with where it
    began; a ``SETITEM(S)`` on the outermost dict gives the values' spans.
    """
    ops = [(op, arg, int(pos or 0)) for op, arg, pos in pickletools.genops(stream)]
    ends = [pos for _, _, pos in ops[1:]] + [len(stream)]
    pieces: list[bytes] = []
    at = 0
    stack: list[tuple[int, bool]] = []  # (where it began, whether it is a mark)
    found: list[tuple[int, int, bool]] = []  # (start, end, alone) of each value
    spans: list[tuple[str, Any, int]] = []  # (op name, arg, position) in the plain stream
    for (op, arg, pos), end in zip(ops, ends, strict=True):
        if op.name == "FRAME":
            continue
        pieces.append(stream[pos:end])
        spans.append((op.name, arg, at))
        before, after = op.stack_before, op.stack_after
        popped: list[tuple[int, bool]] = []
        if pickletools.markobject in before:
            while stack and not stack[-1][1]:
                popped.append(stack.pop())
            mark = stack.pop()
            popped.reverse()
            count = before.index(pickletools.markobject)
            outer = [stack.pop() for _ in range(count)]
            if op.name == "SETITEMS" and not stack:  # the items of the outermost dict
                found.extend(_values(popped, at, alone=False))
            starts = [mark[0], *(s for s, _ in outer)]
        else:
            count = len(before)
            outer = [stack.pop() for _ in range(count)]
            if op.name == "SETITEM" and not stack:
                found.extend(_values([outer[1], outer[0]], at, alone=True))
            starts = [s for s, _ in outer]
        start = min(starts, default=at)
        for kind in after:
            stack.append((at, True) if kind is pickletools.markobject else (start, False))
        at += end - pos
    positions = [pos for _, _, pos in spans]
    return b"".join(pieces), [_item(spans, positions, *where) for where in found]


def _values(
    elements: list[tuple[int, bool]], end: int, *, alone: bool
) -> list[tuple[int, int, bool]]:
    """The spans of the values among ``elements`` (key, value, key...), ending at ``end``."""
    starts = [s for s, _ in elements] + [end]
    return [(starts[k], starts[k + 1], alone) for k in range(1, len(elements), 2)]


def _item(
    spans: list[tuple[str, Any, int]], positions: list[int], start: int, end: int, alone: bool
) -> _Item:
    """The item whose value is at ``start:end`` (``positions``: of each op of ``spans``)."""
    inside = spans[bisect.bisect_left(positions, start) : bisect.bisect_left(positions, end)]
    names = [name for name, _, _ in inside]
    put = frozenset(int(arg) for name, arg, _ in inside if name in _PUTS)
    count = names.count
    return _Item(start, end, count("MEMOIZE"), put, count("NEXT_BUFFER"), alone)


class _Buffers:
    """The out-of-band buffers, counting those taken (a skipped item's are passed over)."""

    def __init__(self, buffers: Sequence[Any]) -> None:
        self._buffers = list(buffers)
        self.taken = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.taken >= len(self._buffers):
            raise StopIteration
        self.taken += 1
        return self._buffers[self.taken - 1]


#: The pure-Python unpickler's handler of each opcode.
_BASE: dict[int, Callable[..., Any]] = pickle._Unpickler.dispatch


_GET_CODES = (pickle.GET[0], pickle.BINGET[0], pickle.LONG_BINGET[0])


def _checked(code: int) -> Callable[[_ItemUnpickler], None]:
    """The handler of memo opcode ``code``, refusing an object a skipped item left unknown."""

    def load(unpickler: _ItemUnpickler) -> None:
        _BASE[code](unpickler)
        unpickler.got()

    return load


class _ItemUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, going on after an item of the dict that fails."""

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(_BASE)
    memo: dict[int, Any]

    def __init__(
        self,
        file: io.BytesIO,
        buffers: Sequence[Any],
        items: list[_Item],
        persistent_load: Callable[[Any], Any] | None,
    ) -> None:
        self._counted = _Buffers(buffers)
        super().__init__(file, buffers=self._counted)
        self._file = file
        self._items = items
        self._starts = [item.start for item in items]
        self._find = persistent_load
        #: The error of each item that did not load, by its key.
        self.failed: dict[Any, Exception] = {}

    def persistent_load(self, pid: Any) -> Any:
        if self._find is None:
            raise pickle.UnpicklingError("the stream names an object by a persistent id")
        return self._find(pid)

    def load(self) -> Any:
        """As :meth:`pickle._Unpickler.load`, an item that raises skipped."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack: list[list[Any]] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        dispatch = self.dispatch
        before: tuple[int, list[Any], int, int, int] | None = None
        next_item = 0
        try:
            while True:
                at = self._file.tell()
                if next_item < len(self._items) and at == self._items[next_item].start:
                    next_item += 1
                    depth, memo = len(self.metastack), len(self.memo)
                    before = (depth, self.stack, len(self.stack), memo, self._counted.taken)
                key = self.read(1)
                if not key:
                    raise EOFError
                try:
                    dispatch[key[0]](self)
                except pickle._Stop:  # type: ignore[attr-defined]
                    raise
                except Exception as exc:
                    k = bisect.bisect_right(self._starts, at) - 1
                    if before is None or k < 0 or k != next_item - 1 or at >= self._items[k].end:
                        raise
                    self._skip(self._items[k], before, exc)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def _skip(
        self, item: _Item, before: tuple[int, list[Any], int, int, int], exc: Exception
    ) -> None:
        """Leave the stack as it was before the item, without its key; go on after it."""
        depth, stack, size, memo, taken = before
        # The objects it was building when it failed, and those it never made, are
        # unknown; those it had made whole (a class it named, say) are as good as any.
        building = [*stack[size:], *self.stack] if self.stack is not stack else stack[size:]
        building += [o for inner in self.metastack[depth + 1 :] for o in inner]
        unknown = {id(o) for o in building}
        del self.metastack[depth:]
        del stack[size:]
        self.stack, self.append = stack, stack.append
        key = stack.pop()
        self.failed[key] = exc
        lost = _Lost(key)
        for index in [*range(memo, memo + item.memoized), *item.put]:
            if index not in self.memo or id(self.memo[index]) in unknown:
                self.memo[index] = lost
        while self._counted.taken < taken + item.buffers:
            next(self._counted)
        self._file.seek(item.end + 1 if item.alone else item.end)  # SETITEM: one byte

    def got(self) -> None:
        """Refuse an object a skipped item put in the memo."""
        if isinstance(self.stack[-1], _Lost):
            raise SharedWithFailed(self.stack.pop().name)

    dispatch.update({code: _checked(code) for code in _GET_CODES})
