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


_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MARK = pickletools.markobject
#: Each opcode's effect on the stack: whether it pops down to a mark, how many elements
#: it pops (below the mark, if it does), how many it pushes, whether it pushes a mark.
_EFFECTS = {
    op.code: (
        _MARK in op.stack_before,
        op.stack_before.index(_MARK) if _MARK in op.stack_before else len(op.stack_before),
        len(op.stack_after),
        _MARK in op.stack_after,
    )
    for op in pickletools.opcodes
}


def _items_of(stream: bytes) -> tuple[bytes, list[_Item]]:
    """The stream without its frames, and where each value of its top-level dict is.

    The stack is followed as :func:`pickletools.dis` does, each element as where it
    began; a ``SETITEM(S)`` on the outermost dict gives the values' spans.
    """
    stack: list[int] = []  # where each element began
    marks: list[tuple[int, int]] = []  # (stack size, where) of each open mark
    found: list[tuple[int, int, bool]] = []  # (start, end, alone) of each value
    frames: list[int] = []  # where each FRAME opcode is, in ``stream``
    positions: list[int] = []  # of each opcode, in the stream without frames
    memoized: list[int] = []  # how many MEMOIZE and NEXT_BUFFER before each opcode
    buffered: list[int] = []
    put: list[tuple[int, int]] = []  # (where, memo index) of each PUT
    memo = taken = 0
    for op, arg, pos in pickletools.genops(stream):
        name = op.name
        if name == "FRAME":
            frames.append(int(pos or 0))
            continue
        at = int(pos or 0) - 9 * len(frames)  # a FRAME is 9 bytes
        positions.append(at)
        memoized.append(memo)
        buffered.append(taken)
        memo += name == "MEMOIZE"
        taken += name == "NEXT_BUFFER"
        if name in _PUTS:
            put.append((at, int(str(arg))))
        to_mark, count, pushed, mark = _EFFECTS[op.code]
        start = at
        if to_mark:
            size, start = marks.pop()
            popped = stack[size:]
            del stack[size:]
            if count:
                start = min(start, *stack[-count:])
                del stack[-count:]
            if name == "SETITEMS" and not stack:  # the items of the outermost dict
                ends = [*popped[2::2], at]
                found.extend(zip(popped[1::2], ends, [False] * len(ends), strict=False))
        elif count:
            outer = stack[-count:]
            del stack[-count:]
            start = min(outer)
            if name == "SETITEM" and not stack:
                found.append((outer[2], at, True))
        if mark:
            marks.append((len(stack), at))
        else:
            stack.extend([start] * pushed)
    plain = _without_frames(stream, frames)
    memoized.append(memo)
    buffered.append(taken)
    positions.append(len(plain))
    return plain, [_item(where, positions, memoized, buffered, put) for where in found]


def _item(
    where: tuple[int, int, bool],
    positions: list[int],
    memoized: list[int],
    buffered: list[int],
    put: list[tuple[int, int]],
) -> _Item:
    """The item at ``where``, with what its opcodes put in the memo and take of the buffers.

    ``memoized`` and ``buffered``: how many MEMOIZE and NEXT_BUFFER opcodes come before
    the opcode at each of ``positions``; ``put``: the PUT opcodes.
    """
    start, end, alone = where
    first, last = bisect.bisect_left(positions, start), bisect.bisect_left(positions, end)
    inside = frozenset(index for at, index in put if start <= at < end)
    memos, buffers = memoized[last] - memoized[first], buffered[last] - buffered[first]
    return _Item(start, end, memos, inside, buffers, alone)


def _without_frames(stream: bytes, frames: list[int]) -> bytes:
    """``stream`` without the FRAME opcodes at ``frames`` (9 bytes each)."""
    if not frames:
        return stream
    pieces, at = [], 0
    for where in frames:
        pieces.append(stream[at:where])
        at = where + 9
    pieces.append(stream[at:])
    return b"".join(pieces)


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
