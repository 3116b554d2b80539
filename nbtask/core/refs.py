"""Values passed to a task by reference: the worker loads them, the sender never holds them.

Two kinds of reference can stand for an argument of a function task:

* a :class:`ValueRef` (in a notebook, a :class:`~nbtask.notebook.kept.RemoteValue`): a
  value kept as blobs, named by their digests;
* a finished task's handle, which pickles as a :class:`ResultRef`: its task id.

Either travels inside the task's signed arguments, so the digests and the task id are as
trusted as the message itself. A worker decodes a task's arguments inside
:func:`resolving`, and each reference is replaced by its value while they are unpickled:
blobs are fetched and checked against their signed digests, and a task's result is read
from its signed record in the store (it must verify and be that send's of that task, by
the worker's own app: see :data:`~nbtask.wire.events.Run`), before anything is
unpickled. Anywhere else (a chain's pickled steps, a result, the client) a reference
unpickles as itself, so it moves on untouched until a worker runs the task that takes it.

A message that carries a :class:`ValueRef` pins its blobs in the store for ``result_ttl``
(the task may load them after the sender let the value go): :func:`noting_refs` tells
the message builder which references it pickled.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nbtask.brokers.base import Store
from nbtask.core.bound import Bound
from nbtask.core.holding import Holding, value_key
from nbtask.errors import BlobError, ResultNotReady, SignatureError
from nbtask.wire.blobs import Fetch, Packed, Part, blob_sizes, join_value
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Deferred, EventType, Unloadable, decode_event

__all__ = ["ResultRef", "ValueRef", "blobs_of", "noting_refs", "resolving"]

#: Loads a reference's value; set only while a worker decodes a task's own arguments.
_Resolver = Callable[["ValueRef | ResultRef"], Any]
_resolver: contextvars.ContextVar[_Resolver | None] = contextvars.ContextVar(
    "nbtask_resolver", default=None
)
#: Collects the value references pickled; set only while a message is built.
_noted: contextvars.ContextVar[list[ValueRef] | None] = contextvars.ContextVar(
    "nbtask_noted_refs", default=None
)


class ValueRef:
    """A value kept out of band as blobs: passed to a task, the worker loads it.

    Parameters
    ----------
    name
        What the value is called (a notebook name), used in errors.
    layout, inline
        Where its parts are (blobs named by signed digest) and its small inline parts.

    Attributes
    ----------
    holder, holder_pid : str or None, int
        The own queue and the process id of the worker process that holds the value live
        in memory (:mod:`nbtask.core.holding`), if one does: work that reads it goes
        there while that process lives (:mod:`nbtask.core.placement`).
    """

    #: The id made for this value alone when it was kept (a notebook's keeper), "" if it has
    #: none (a reference pickled before keepers existed): part of its key in a holding.
    keeper = ""

    def __init__(self, name: str, layout: list[Part], inline: bytes) -> None:
        self.name = name
        self.layout = layout
        self.inline = inline
        self.holder: str | None = None
        self.holder_pid = 0

    @property
    def key(self) -> str:
        """The value's key in a worker's holding (:func:`~nbtask.core.holding.value_key`).

        Its own (by its keeper): another value kept with the same bytes is another object.
        """
        return value_key(self.layout, self.inline, self.keeper)

    @property
    def content_key(self) -> str:
        """Its key by content, unsealed: what :func:`~nbtask.core.holding.key_of` gives it."""
        return value_key(self.layout, self.inline)

    @property
    def size(self) -> int:
        """The value's pickled size in bytes: what loading it moves."""
        return sum(part.size for part in self.layout)

    @property
    def blob_sizes(self) -> dict[str, int]:
        """``{digest: size}`` of its blobs."""
        return blob_sizes(self.layout)

    @property
    def sealed(self) -> bool:
        """Whether its blobs are sealed (named by id: :mod:`nbtask.wire.blobs`)."""
        return any(part.sealed for part in self.layout)

    def load(
        self, fetch: Fetch, signer: Signer | None = None, digests: dict[str, str] | None = None
    ) -> Any:
        """The value, its blobs read through ``fetch`` and checked against their digests.

        ``signer`` checks the seals of sealed blobs; ``digests``, if given, is filled with
        their digests (``{id: digest}``), found as they were checked.
        """
        loaded = join_value(self.layout, self.inline, fetch, signer, digests)
        # A value a notebook cell kept was pickled once before it was split (Packed).
        return loaded.load() if isinstance(loaded, Packed) else loaded

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        noted = _noted.get()
        if noted is not None:
            noted.append(self)
        return (_rebuild, (type(self), self.__getstate__()))


class ResultRef:
    """A finished task's result, by task id: what a task handle pickles as.

    Parameters
    ----------
    task_id, name
        The task whose stored result stands for the argument, and its name (for errors).
    sent
        The signed ``created`` of the handle's send, ``None`` where its handle did not
        know it: only a result of that send is taken.
    """

    sent: float | None = None  # (a reference pickled without it: any send of the app's)

    def __init__(self, task_id: str, name: str, sent: float | None = None) -> None:
        self.task_id = task_id
        self.name = name
        self.sent = sent

    def load(self, store: Store, signer: Signer, prefix: str) -> Any:
        """The task's result, from its signed record in ``store`` of the app ``prefix``.

        Raises
        ------
        BlobError
            The task's record is gone (it expired after ``result_ttl``) or holds no result.
        SignatureError
            The stored result does not verify, or is another task's, another app's or
            another send's (an earlier task with the same id).
        ResultNotReady
            The task did not succeed.
        """
        label = f"the result of task {self.name}[{self.task_id}]"
        record = store.get_record(self.task_id)
        if record is None or record.result is None:
            raise BlobError(
                f"{label}, passed by reference, is not in the store: it expired (results are "
                "kept result_ttl), was never stored (ignore_result), or was deleted; run that "
                "task again"
            )
        event, value = decode_event(signer, record.result, store.get_blob)
        if event.task_id != self.task_id:
            raise SignatureError(f"{label} in the store belongs to task {event.task_id!r}")
        why = event.not_for(prefix, self.sent)
        if why is not None:
            raise SignatureError(f"{label} in the store is not the one passed: {why}")
        if event.type is not EventType.SUCCESS:
            raise ResultNotReady(f"{label} cannot be an argument: that task ended {event.type}")
        if event.data.get("result_kept") is False:
            # A signed note that the task ended, without its value (ignore_result).
            raise BlobError(
                f"{label}, passed by reference, was not kept (ignore_result): send the value "
                "itself, or chain the tasks"
            )
        if isinstance(value, Deferred):
            return value.load()
        if isinstance(value, Unloadable):
            raise BlobError(f"{label} cannot be loaded on this worker: {value.why}")
        return value

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        state = {"task_id": self.task_id, "name": self.name, "sent": self.sent}
        return (_rebuild, (ResultRef, state))

    def __repr__(self) -> str:
        return f"<result of {self.name}[{self.task_id}]>"


def _rebuild(cls: type[ValueRef | ResultRef], state: dict[str, Any]) -> Any:
    """Unpickle a reference: as itself, or, inside :func:`resolving`, as its value."""
    ref = cls.__new__(cls)
    ref.__dict__.update(state)
    resolve = _resolver.get()
    return ref if resolve is None else resolve(ref)


def blobs_of(refs: Iterable[ValueRef]) -> dict[str, int]:
    """``{digest: size}`` of the blobs of every reference in ``refs``."""
    return {digest: size for ref in refs for digest, size in ref.blob_sizes.items()}


@contextlib.contextmanager
def noting_refs() -> Iterator[list[ValueRef]]:
    """Within the block, the :class:`ValueRef` objects pickled are added to the list given."""
    noted: list[ValueRef] = []
    token = _noted.set(noted)
    try:
        yield noted
    finally:
        _noted.reset(token)


def resolving(
    store: Store, signer: Signer, prefix: str, holding: Holding | None = None
) -> Bound[_Resolver | None]:
    """Within the ``with`` block, references that are unpickled load their values from ``store``.

    A worker of the app ``prefix`` (its key prefix) decodes a task's arguments in it. A
    value ``holding`` holds is lent as it is (no blob is read). Errors name the value that
    could not be loaded (:class:`~nbtask.errors.BlobError` when its data expired).
    """

    def resolve(ref: ValueRef | ResultRef) -> Any:
        if isinstance(ref, ResultRef):
            return ref.load(store, signer, prefix)
        held = holding.lend(ref.key) if holding is not None else None
        if held is not None:
            return held.value
        try:
            return ref.load(store.get_blob, signer)
        except BlobError as exc:
            raise BlobError(
                f"the kept value {ref.name!r} ({ref.size:,} bytes), passed by reference, "
                f"cannot be loaded: {exc}"
            ) from None

    return Bound(_resolver, resolve)
