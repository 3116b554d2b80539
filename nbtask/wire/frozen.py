"""Instances of frozen dataclasses made as their ``__init__`` would, on per-task paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["FrozenMaker"]

T = TypeVar("T")


class FrozenMaker(Generic[T]):
    """Makes instances of the frozen dataclass ``cls`` a few times faster than its ``__init__``.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; this
    fills the instance's dict at once, with the same result: every field, in order, at its
    default (a ``default_factory`` called anew) unless given. As ``__init__``, it refuses a
    missing required field and an unknown one. For classes without ``__post_init__``.
    """

    def __init__(self, cls: type[T]) -> None:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__} has a __post_init__")
        self._cls = cls
        self._template = {
            f.name: None if f.default is dataclasses.MISSING else f.default for f in fields
        }
        self._factories: tuple[tuple[str, Callable[[], Any]], ...] = tuple(
            (f.name, f.default_factory)
            for f in fields
            if f.default_factory is not dataclasses.MISSING
        )
        self._required = frozenset(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )

    def __call__(self, **values: Any) -> T:
        """An instance with these field values (the others at their defaults)."""
        made = object.__new__(self._cls)
        fields = made.__dict__
        fields.update(self._template)
        fields.update(values)
        if len(fields) != len(self._template):
            unknown = sorted(set(values) - set(self._template))
            raise TypeError(f"{self._cls.__name__} has no field {unknown[0]!r}")
        if not values.keys() >= self._required:
            missing = sorted(self._required - set(values))
            raise TypeError(f"{self._cls.__name__} needs field {missing[0]!r}")
        for name, factory in self._factories:
            if name not in values:
                fields[name] = factory()
        return made
