"""Values a ``%%task`` cell keeps away from the kernel, with a preview made on the worker.

A name a cell assigns whose pickled size is ``keep_threshold`` or more (or one named with
``--keep``) does not come back into the kernel: the worker stores it as blobs (shared
memory on one host, else the store) and the notebook gets a :class:`RemoteValue` in its
place. Its repr shows a preview computed where the value lives (type, shape, dtype, size
in bytes, and the start of its repr or HTML). It is brought into the kernel only when used:
a local cell that reads the name fetches it first, ``value.fetch()`` does so explicitly,
and a later ``%%task`` cell that reads it ships only the reference: it runs on the worker
process holding the value (see :mod:`nbtask.notebook.placement`), or on another that loads
the blobs itself, so the bytes never pass through the kernel.

Each kept value has a keeper id of its own (random, made where it was kept), noted as a
use of its blobs in the store: releasing the value (:mod:`nbtask.notebook.releases`)
deletes its store copy once no other use needs those bytes.
"""

from __future__ import annotations

import contextlib
import functools
import html
import secrets
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.core.handle import FetchWatch
from nbtask.core.holding import value_key
from nbtask.core.refs import ValueRef
from nbtask.errors import BlobError, BlobGone
from nbtask.wire.blobs import BlobReader, Packed, Part, content_layout, seal_blob, split_value
from nbtask.wire.envelope import Buffer, Signer

__all__ = ["RemoteValue", "Sealing", "keep", "key_by_content", "preview_of"]

_HEAD_CHARS = 2000
_OWN_FIELDS = frozenset({"name", "layout", "inline", "holder", "holder_pid", "preview", "made_by"})


def _refusing(use: str) -> Callable[..., Any]:
    """A :class:`RemoteValue` method that code reaching it instead of its value calls.

    It raises one ``TypeError`` saying so (``use`` names the use, ``{name}`` the variable),
    once the reference is let go: the notebook keeps the error and its traceback
    (``sys.last_value``), and a frame holding the reference would keep the value on its
    holder after ``x = x.fetch()``.
    """

    def refuse(self: RemoteValue, *args: object, **kwargs: object) -> Any:
        error = TypeError(self._not_here(use.format(name=self._called())))
        del self
        raise error

    return refuse


class RemoteValue(ValueRef):
    """A value kept out of this kernel: its bytes stay as blobs; its preview came along.

    Passed to a function task (``f.delay(x)``), it travels as a reference: the task goes
    to the process holding it, or the worker loads it (:mod:`nbtask.core.refs`).

    Parameters
    ----------
    name
        The name the cell assigned it to.
    layout, inline
        Where its parts are (blobs named by signed digest) and its small inline parts.
    preview
        ``type``, ``shape``, ``dtype``, ``nbytes`` and ``head`` (text) or ``html``,
        computed on the worker.

    Attributes
    ----------
    made_by : str
        The cell that made it (``Cell In[3]``), named if the value is ever lost.
    keeper : str
        Its use of its blobs in the store, released with it ("" if it has none).
    """

    #: Why the value is gone (its session ended and released it), or "".
    released = ""
    _signer: Signer | None = None  # also for a reference pickled before seals existed
    #: The names the notebook binds to it (see :meth:`bind`).
    _names: Callable[[RemoteValue], list[str]] | None = None
    #: The value fetched, while it lives (weakly: a value looked at once, ``x.fetch()[:5]``,
    #: is not kept in the kernel by its reference).
    _fetched: Callable[[], Any] | None = None

    def __init__(
        self, name: str, layout: list[Part], inline: bytes, preview: Mapping[str, Any]
    ) -> None:
        super().__init__(name, layout, inline)
        self.preview = dict(preview)
        self.made_by = ""
        self._fetch: BlobReader | None = None
        self._budget: int | None = None
        self._watch: FetchWatch | None = None

    def bind(
        self,
        fetch: BlobReader,
        budget: int,
        watch: FetchWatch | None = None,
        *,
        signer: Signer | None = None,
        names: Callable[[RemoteValue], list[str]] | None = None,
    ) -> None:
        """Let :meth:`fetch` read this process's store, up to ``budget`` bytes.

        ``watch``, if given, shows the fetch's progress (a notebook's bar); ``signer``
        checks the seals of sealed blobs (:mod:`nbtask.wire.blobs`), the one given before
        if none is; ``names`` lists the names the notebook binds to this reference, which
        its messages use once its own name is bound to something else (``alias = x``,
        then ``del x``: it is ``alias``), the one given before if none is.
        """
        self._fetch, self._budget, self._watch = fetch, budget, watch
        self._signer = signer or self._signer
        self._names = names or self._names

    def fetch(self, *, force: bool = False) -> Any:
        """Bring the value into this process: the object fetched before, while it lives.

        Every name bound to one reference stands for one object (``alias = big`` in a
        cell): fetched through each, it is one object, as it would be locally, and its
        bytes come once (a value that cannot be referenced weakly, a list say, is
        fetched anew).

        Raises
        ------
        BlobError
            It is over the fetch budget (``fetch_budget``; ``force=True`` ignores it), or
            its blobs expired or do not match their digests.
        """
        if self.released:
            raise BlobError(self._gone())
        value = self._fetched() if self._fetched is not None else None
        if value is not None:
            return value
        name = self._called()
        if self._fetch is None:
            raise BlobError(f"{name} was not received through an app: nothing to fetch with")
        if not force and self._budget is not None and self.size > self._budget:
            raise BlobError(
                f"{name} is {self.size:,} bytes, over the fetch budget of "
                f"{self._budget:,} (fetch_budget, NBTASK_FETCH_BUDGET): fetch it anyway with "
                f"{name} = {name}.fetch(force=True), or work on it in a %%task cell"
            )
        try:
            if self._watch is None:
                value = self.load(self._fetch, self._signer)
            else:
                with self._watch(name, self.size) as progress:
                    fetch = functools.partial(self._fetch, progress=progress)
                    value = self.load(fetch, self._signer)
        except BlobGone as exc:  # the store knows a blob, the notebook the cell behind it
            made_by = self.made_by or "the cell that made it"
            raise BlobGone(
                f"{name} cannot be fetched: {exc.reason}", f"run {made_by} again to make it"
            ) from None
        with contextlib.suppress(TypeError):  # not weakly referable: fetched anew
            self._fetched = weakref.ref(value)
        return value

    @property
    def fetched(self) -> bool:
        """Whether the value was fetched and still lives here (:meth:`fetch` returns it)."""
        return self._fetched is not None and self._fetched() is not None

    def release(self, why: str) -> None:
        """Note that the value was released (``why``): using it now says so."""
        self.released = why
        self._fetch = self._fetched = None

    def _called(self) -> str:
        """The name the notebook knows the value by: its own while bound to it, else another.

        Several names may stand for one reference (``alias = x``): the one the cell that
        kept it assigned stays while it is bound to it.
        """
        try:
            names = self._names(self) if self._names is not None else []
        except RuntimeError:  # the namespace changed while another thread read it
            names = []
        return self.name if not names or self.name in names else names[0]

    def _gone(self) -> str:
        made_by = self.made_by or "the cell that made it"
        return (
            f"{self._called()} was released {self.released}: its store copy was deleted. Run "
            f"{made_by} again to make it"
        )

    def _not_here(self, use: str) -> str:
        """Why ``use`` of the reference fails: it stands for a value kept elsewhere."""
        if self.released:
            return f"{use}: {self._gone()}"
        name = self._called()
        return (
            f"{use}: {name} ({self.preview.get('type', '?')}) is kept on the workers, and "
            "this code reached it without the cell naming it (in a function, eval, "
            f"globals()...), so it was not fetched: fetch it first ({name} = {name}.fetch(), "
            f"or any cell that reads {name}), or use it in a %%task cell"
        )

    # What code that reaches the reference instead of the value tries first: one error
    # saying so, not "'RemoteValue' object is not subscriptable" (see _refusing).
    def __getattr__(self, attribute: str) -> Any:
        # Dunders, IPython's probes and the reference's own fields: the usual miss.
        if attribute.startswith("_") or attribute in _OWN_FIELDS:
            raise AttributeError(attribute)
        # Named, so that Python does not set the error's ``obj`` to the reference.
        error = AttributeError(self._not_here(f"{self._called()}.{attribute}"), name=attribute)
        del self
        raise error

    __getitem__ = _refusing("{name}[...]")
    __len__ = _refusing("len({name})")
    __iter__ = _refusing("iter({name})")
    __array__ = _refusing("numpy.asarray({name})")

    def __bool__(self) -> bool:
        return True  # a reference is there, whatever its value: len() is not asked

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        if self.released:  # sent to a cell or a task, it would find its data gone
            raise BlobError(self._gone())
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict[str, Any]:
        # The fetcher and budget belong to the process that holds the reference.
        state = dict(self.__dict__)
        state["_fetch"] = state["_budget"] = state["_watch"] = state["_signer"] = None
        state.pop("_names", None)  # the notebook's namespace is the notebook's
        state.pop("_fetched", None)  # the value itself never travels with its reference
        return state

    def _summary(self) -> str:
        name = self._called()
        if self.released:
            return f"{name}: released {self.released}; run {self.made_by or 'its cell'} again"
        p = self.preview
        details = [str(p.get("type", "?"))]
        if p.get("shape") is not None:
            details.append(f"shape={tuple(p['shape'])}")
        if p.get("dtype"):
            details.append(f"dtype={p['dtype']}")
        details.append(f"{int(p.get('nbytes', self.size)):,} bytes")
        return (
            f"{name}: kept on the workers ({', '.join(details)}); a local cell that "
            f"reads it fetches it, {name}.fetch() does so now, a %%task cell uses it "
            "in place"
        )

    def __repr__(self) -> str:
        head = self.preview.get("head") or ""
        return f"<{self._summary()}>" + (f"\n{head}" if head else "")

    def _repr_html_(self) -> str:
        body = self.preview.get("html") or f"<pre>{html.escape(self.preview.get('head', ''))}</pre>"
        return f"<div><p><b>{html.escape(self._summary())}</b></p>{body}</div>"


def preview_of(value: Any) -> dict[str, Any]:
    """What a notebook shows of a value it does not hold; never raises."""
    preview: dict[str, Any] = {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
    for field, convert in (("shape", list), ("dtype", str), ("nbytes", int)):
        try:
            found = getattr(value, field, None)
            if found is not None:
                preview[field] = convert(found)
        except Exception:
            continue
    head = value
    if _has(value, "head"):  # a DataFrame, a Series: their first rows
        try:
            head = value.head()
        except Exception:
            head = value
    preview["head"] = _text(lambda: repr(head))
    if _has(head, "_repr_html_"):
        preview["html"] = _text(head._repr_html_, limit=20 * _HEAD_CHARS)
    return preview


def _has(value: Any, attribute: str) -> bool:
    try:
        return callable(getattr(value, attribute, None))
    except Exception:
        return False


def _text(make: Callable[[], object], limit: int = _HEAD_CHARS) -> str:
    try:
        text = str(make())
    except Exception as exc:
        return f"<no preview: {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit] + " ..."


class Sealing:
    """Seals a kept value's blobs as they are written, and so learns its key by content.

    Given as ``put_blobs(..., seal=)``: the store calls it with each blob where it writes
    it (in the background for a copy written later), so the hash is off the cell's path.
    """

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.digests: dict[str, str] = {}
        self.reference: RemoteValue | None = None

    def __call__(self, name: str, data: Buffer) -> bytes:
        """The seal stored after the blob ``name``'s bytes ``data``."""
        digest, seal = seal_blob(self.signer, name, data)
        self.digests[name] = digest
        return seal

    def content_key(self) -> str:
        """The key the value would have unsealed; "" until every blob of it was sealed."""
        reference = self.reference
        if reference is None or set(reference.blob_sizes) - set(self.digests):
            return ""
        return key_by_content(reference, self.digests)


def key_by_content(reference: ValueRef, digests: Mapping[str, str]) -> str:
    """The key ``reference``'s value has by content, its sealed blobs' ``digests`` given.

    What :func:`~nbtask.core.holding.key_of` gives the value while it is unchanged.
    """
    return value_key(content_layout(reference.layout, digests), reference.inline)


def keep(
    name: str,
    value: Any,
    packed: Packed,
    put: Callable[[Mapping[str, Buffer], str], None],
    *,
    sealed: bool = False,
) -> RemoteValue:
    """Store ``value`` (``packed``) as blobs through ``put``; return what to send instead.

    ``put(blobs, keeper)`` notes the new value's keeper id as a use of its blobs.
    ``sealed``: its blobs are named by random ids (``put`` seals them: :class:`Sealing`).
    """
    split = split_value(packed, threshold=0, sealed=sealed)
    keeper = secrets.token_hex(16)
    put(split.blobs, keeper)
    inline = b"".join(bytes(part) for part in split.inline)
    reference = RemoteValue(name, split.layout, inline, preview_of(value))
    reference.keeper = keeper
    return reference
