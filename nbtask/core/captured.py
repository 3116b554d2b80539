"""What a task shipped by value captured, so its pickle is reused only while that holds.

A task defined in a notebook travels as a cloudpickle of its class, its functions, and the
globals, closure cells and defaults those functions read, as they are when it is sent.
Pickling it on every send costs tens of microseconds; :func:`capture` records instead
which objects the pickle holds, by identity, and :meth:`Capture.unchanged` tells in a
fraction of that whether they are all still the same.

Objects that can change in place without changing identity (a list, a dict, an array, an
instance of a user class) cannot be checked that way: a task reading one as a global is
pickled afresh on every send (``capture`` returns ``None``).
"""

from __future__ import annotations

import operator
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

import cloudpickle

from nbtask.core.named import reduced_by_name
from nbtask.core.task import Task

__all__ = ["Capture", "capture"]

_MISSING: Any = object()
# Immutable values whose identity is enough (a tuple or frozenset is walked: its items count).
_ATOMS: frozenset[type] = frozenset(
    {int, float, complex, str, bytes, bool, type(None), type(Ellipsis), range, types.CodeType}
)
# A class's own slots: made by the class itself, never pickled as values.
_DESCRIPTORS = (
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
)
_REDUCERS = ("__getstate__", "__reduce__", "__reduce_ex__")
# cloudpickle.register_pickle_by_value's registry (a set of module names).
_BY_VALUE_MODULES: set[str] = cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
# What a function's pickle holds besides its globals and closure (cloudpickle's slot state).
_FUNCTION_SLOTS = ("__code__", "__name__", "__qualname__", "__module__", "__doc__", "__defaults__")
_FUNCTION_MAPPINGS = ("__dict__", "__annotations__", "__kwdefaults__")


class Uncacheable(Exception):
    """A pickled object holds something that can change without changing identity."""


class Capture:
    """The objects a task's pickle holds, each with the place it was read from.

    Unchanged while every place still gives the same object and every mapping read from
    has the same size.
    """

    __slots__ = (
        "absent_from",
        "absent_keys",
        "attribute_values",
        "by_value_modules",
        "keys",
        "mappings",
        "names",
        "owners",
        "sized",
        "sizes",
        "values",
        "weak",
    )

    def __init__(self) -> None:
        # Parallel lists, checked by C loops (map over them): a check then costs little
        # more than a dictionary lookup per object.
        self.absent_from: list[Mapping[Any, Any]] = []  # names looked up and not found
        self.absent_keys: list[Any] = []
        self.mappings: list[Mapping[Any, Any]] = []  # mappings[i][keys[i]] is values[i]
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.owners: list[object] = []  # getattr(owners[i], names[i]) is attribute_values[i]
        self.names: list[str] = []
        self.attribute_values: list[Any] = []
        self.sized: list[Sized] = []  # len(sized[i]) == sizes[i]
        self.sizes: list[int] = []
        # Tasks, held weakly (a cached task must not keep itself alive): (mapping or
        # owner, key or attribute name, reference, whether the first is a mapping).
        self.weak: list[tuple[Any, Any, Callable[[], Any], bool]] = []
        # The modules registered to be pickled by value (the notebook registers the ones
        # written next to it): what is pickled by name depends on them.
        self.by_value_modules = frozenset(_BY_VALUE_MODULES)

    def record(self, place: Any, key: Any, value: Any, in_mapping: bool) -> None:
        """Note that ``value`` was read from ``place[key]`` (or ``getattr(place, key)``)."""
        if isinstance(value, Task):
            self.weak.append((place, key, weakref.ref(value), in_mapping))
        elif value is _MISSING:
            self.absent_from.append(place)
            self.absent_keys.append(key)
        elif in_mapping:
            self.mappings.append(place)
            self.keys.append(key)
            self.values.append(value)
        else:
            self.owners.append(place)
            self.names.append(key)
            self.attribute_values.append(value)

    def unchanged(self) -> bool:
        """Whether every object the pickle holds is still the one read from its place."""
        try:
            return (
                list(map(len, self.sized)) == self.sizes
                and self.by_value_modules == _BY_VALUE_MODULES
                and all(
                    map(operator.is_, map(operator.getitem, self.mappings, self.keys), self.values)
                )
                and all(
                    map(operator.is_, map(getattr, self.owners, self.names), self.attribute_values)
                )
                and not any(map(operator.contains, self.absent_from, self.absent_keys))
                and all(map(_still, self.weak))
            )
        except (KeyError, AttributeError, ValueError):  # gone since (ValueError: an empty cell)
            return False


def _still(weak: tuple[Any, Any, Callable[[], Any], bool]) -> bool:
    place, key, ref, in_mapping = weak
    task = ref()
    now = place.get(key, _MISSING) if in_mapping else getattr(place, key, _MISSING)
    return task is not None and now is task


def capture(task: Task) -> Capture | None:
    """What pickling ``task`` by value reads now, or ``None`` if it cannot be checked cheaply."""
    walk = _Walk()
    try:
        walk.value(task)
    except Exception:  # Uncacheable, or an object too odd to walk: pickled at every send
        return None
    return walk.capture


class _Walk:
    """Goes through what cloudpickle pickles by value, recording where each part was read."""

    def __init__(self) -> None:
        self.capture = Capture()
        self.seen: set[int] = set()  # (every object seen is alive: the walk holds a path to it)

    def value(self, obj: Any) -> None:
        kind = type(obj)
        if kind in _ATOMS:
            return
        if kind is tuple or kind is frozenset:
            for item in obj:
                self.value(item)
            return
        if kind is types.GenericAlias or kind is types.UnionType:  # list[int], int | None
            self.value(
                (obj.__origin__, obj.__args__) if kind is types.GenericAlias else obj.__args__
            )
            return
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        self.shared(obj)

    def shared(self, obj: Any) -> None:
        """An object the pickle may hold by name (once per walk), or as a value."""
        if isinstance(obj, (types.ModuleType, types.FunctionType, type)):
            if _by_reference(obj):
                return
            if isinstance(obj, types.FunctionType):
                self.function(obj)
            elif isinstance(obj, type):
                self.cls(obj)
            else:  # a module registered to be pickled by value
                raise Uncacheable(obj)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.value(obj.__func__)
        elif isinstance(obj, property):
            self.value((obj.fget, obj.fset, obj.fdel, obj.__doc__))
        elif isinstance(obj, Task):  # pickled as its class and its __dict__ but the app
            if reduced_by_name(obj, Task) is not None:
                self.named(obj)
                return
            if not _pickled_as_tasks_are(type(obj)):
                raise Uncacheable(obj)
            self.value(type(obj))
            self.mapping(obj.__dict__, skip=("app",))
        elif not (
            isinstance(obj, _DESCRIPTORS)
            or (
                isinstance(obj, types.BuiltinFunctionType)
                and isinstance(obj.__self__, (types.ModuleType, type(None)))
            )
        ):
            raise Uncacheable(obj)

    def named(self, task: Task) -> None:
        """A task pickled by name: by value again once its module holds another object."""
        cls = type(task)
        if "." in cls.__qualname__:
            raise Uncacheable(task)
        namespace = vars(sys.modules[cls.__module__])
        self.capture.record(namespace, cls.__qualname__, task, in_mapping=True)

    def function(self, func: types.FunctionType) -> None:
        self.attributes_of(func, _FUNCTION_SLOTS)
        for name in _FUNCTION_MAPPINGS:
            mapping = getattr(func, name)
            self.capture.record(func, name, mapping, in_mapping=False)
            if mapping is not None:
                self.mapping(mapping)
        self.globals_of(func.__globals__, _code_globals(func.__code__))
        for cell in func.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                raise Uncacheable(cell) from None
            self.capture.record(cell, "cell_contents", contents, in_mapping=False)
            self.value(contents)

    def cls(self, cls: type) -> None:
        if type(cls) is not type:  # a metaclass (ABCMeta's registry, Enum) keeps more state
            raise Uncacheable(cls)
        self.attributes_of(cls, ("__bases__", "__name__"))
        self.mapping(cls.__dict__)

    def attributes_of(self, owner: object, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(owner, name)
            self.capture.record(owner, name, value, in_mapping=False)
            self.value(value)

    def globals_of(self, namespace: dict[str, Any], names: Iterable[str]) -> None:
        for name in names:
            value = namespace.get(name, _MISSING)
            self.capture.record(namespace, name, value, in_mapping=True)
            if value is not _MISSING:
                self.value(value)

    def mapping(self, mapping: Mapping[Any, Any], skip: tuple[str, ...] = ()) -> None:
        self.capture.sized.append(mapping)
        self.capture.sizes.append(len(mapping))
        for key, value in list(mapping.items()):
            if key in skip:
                continue
            self.capture.record(mapping, key, value, in_mapping=True)
            self.value(value)


def _pickled_as_tasks_are(cls: type[Task]) -> bool:
    """Whether instances of ``cls`` pickle as :class:`Task`'s do (no reducer of their own)."""
    return all(getattr(cls, name) is getattr(Task, name) for name in _REDUCERS)


def _by_reference(obj: Any) -> bool:
    """Whether cloudpickle pickles ``obj`` (a module, function or class) by name."""
    return bool(cloudpickle.cloudpickle._should_pickle_by_reference(obj))


def _code_globals(code: types.CodeType) -> Iterable[str]:
    """The global names ``code`` (and code nested in it) reads, as cloudpickle finds them."""
    return cloudpickle.cloudpickle._extract_code_globals(code)  # type: ignore[no-any-return]
