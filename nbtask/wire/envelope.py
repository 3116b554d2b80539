"""The signed wire format shared by task messages, events and stored results.

A message is ``MAGIC | header length | JSON header | body | HMAC-SHA256``::

    b"NBT" version(1 byte) | uint32 big-endian header length | header | body | mac(32)

The MAC covers everything before it. :meth:`Signer.open` checks size, magic, version and
MAC before it parses a single byte of the header, and the body (a cloudpickle) can only be
loaded from an :class:`Envelope` that ``open`` returned, so nothing unverified is ever
unpickled.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import json.encoder
import struct
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import cloudpickle

from nbtask.errors import ConfigurationError, SignatureError, TooLarge
from nbtask.settings import Settings

__all__ = [
    "FORMAT_VERSION",
    "INSECURE_KEY",
    "Envelope",
    "Pickler",
    "Signer",
    "dumps",
    "key_id",
]

#: Raised with every change peers must agree on (2: an event names its app and send).
FORMAT_VERSION = 2
MAGIC = b"NBT"
# Used only with insecure=True: integrity against accidents, no protection against anyone.
INSECURE_KEY = b"nbtask-insecure-public-key"
_LENGTH = struct.Struct(">I")
_MAC_SIZE = hashlib.sha256().digest_size
_PREFIX_SIZE = len(MAGIC) + 1 + _LENGTH.size
_MIN_SIZE = _PREFIX_SIZE + 2 + _MAC_SIZE  # the smallest header is "{}"
#: What a tag's input begins with (no envelope does): see :meth:`Signer.tag`.
_TAG_PREFIX = b"nbtask tag\x00"
# A message body: bytes, or a view into a received message (not copied).
Buffer = bytes | bytearray | memoryview
# One encoder and decoder for every header: json.dumps/loads with options build new ones.
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))
_HEADER_DECODER = json.JSONDecoder()
# Its scanner (json's C one, when there is one), set by JSONDecoder.__init__.
_scan_header: Callable[[str, int], tuple[Any, int]] = vars(_HEADER_DECODER)["scan_once"]


def _header_encoder() -> Callable[[Mapping[str, Any]], str]:
    """``JSONEncoder.encode`` without making its C encoder again at every call.

    No check for circular references: a header is plain data made by nbtask.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without json's C speedups
        return _HEADER_ENCODER.encode
    # (markers, default, encoder, indent, key and item separators, sort_keys, skipkeys,
    # allow_nan), as JSONEncoder.iterencode passes them. A Python whose encoder takes
    # other arguments, or makes other text of them, gets JSONEncoder.encode.
    sample = {"a": [1, 2.5, None, True], "b": "\u00e9\n"}
    try:
        encode = make(
            None,
            _HEADER_ENCODER.default,
            json.encoder.encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            True,
        )
        if "".join(encode(sample, 0)) != _HEADER_ENCODER.encode(sample):
            return _HEADER_ENCODER.encode
    except TypeError:
        return _HEADER_ENCODER.encode
    return lambda header: "".join(encode(header, 0))


_encode_header = _header_encoder()


def _decode_header(text: str) -> Any:
    """``JSONDecoder.decode`` of a header, its scanner called directly when it is all JSON."""
    try:
        value, end = _scan_header(text, 0)
    except StopIteration:  # not JSON at its start: decode() says why
        end = -1
    # Whitespace around it or more after it: decode() accepts or refuses it.
    return value if end == len(text) else _HEADER_DECODER.decode(text)


def key_id(key: str | bytes) -> str:
    """A short public name for a secret, to tell secrets apart without revealing them."""
    return hashlib.sha256(b"nbtask key id\x00" + _as_bytes(key)).hexdigest()[:16]


class _Mac:
    """HMAC-SHA256 under one key, set up once: each message's MAC starts from a copy.

    The same MAC as :func:`hmac.digest`; copying a keyed HMAC costs less than keying a
    new one, the larger part of a small message's MAC.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        keyed = hmac.new(key, digestmod=hashlib.sha256)
        # The OpenSSL HMAC inside, where hmac wraps one (CPython's does): its copy, update
        # and digest are then C calls, without hmac's Python method around each (typed as
        # the wrapper: the same three methods).
        self._keyed: hmac.HMAC = getattr(keyed, "_hmac", None) or keyed

    def digest(self, *parts: Buffer) -> bytes:
        """The MAC of ``parts`` joined (fed one by one: nothing is copied)."""
        mac = self._keyed.copy()
        for part in parts:
            mac.update(part)
        return mac.digest()


def _code_keeping_its_file(code: types.CodeType) -> Any:
    """Cloudpickle's code reducer, keeping the file name it drops.

    A function shipped by value then still reports ``File "/path/to/script.py", line 17``
    (or ``Cell In[7]``) in a traceback, as it would where it was defined.
    """
    rebuild, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _with_its_slots(cls: type, reduced: Any) -> Any:
    """Cloudpickle's reduction of a class pickled by value, made to rebuild its slots.

    Cloudpickle makes the class anew without ``__slots__`` and sets that attribute
    afterwards, which makes no slot: an object of the rebuilt class keeps its attributes
    in a ``__dict__``, and once pickled back to where the class is the real one (found
    again by its tracker id) it cannot be loaded (``'Frozen' object has no attribute
    '__dict__'``). :func:`_skeleton_with_slots` makes it with its slots, as where it was
    defined; the rest of the reduction is cloudpickle's own.
    """
    if (
        not isinstance(reduced, tuple)
        or reduced[0] is not _MAKE_SKELETON_CLASS
        or "__slots__" not in vars(cls)
    ):
        return reduced
    return (_skeleton_with_slots, (*reduced[1], vars(cls)["__slots__"]), *reduced[2:])


def _skeleton_with_slots(
    metaclass: type,
    name: str,
    bases: tuple[type, ...],
    type_kwargs: dict[str, Any],
    tracker_id: str,
    extra: Any,
    slots: Any,
) -> type:
    """Cloudpickle's skeleton of a class, made with its ``slots`` where it takes them.

    A class whose metaclass or bases refuse ``__slots__`` in the namespace (a
    ``typing.NamedTuple``, which makes its own) is made as cloudpickle makes it.
    """
    try:
        with_slots = {**type_kwargs, "__slots__": slots}
        return _MAKE_SKELETON_CLASS(metaclass, name, bases, with_slots, tracker_id, extra)
    except (TypeError, ValueError, AttributeError):
        return _MAKE_SKELETON_CLASS(metaclass, name, bases, type_kwargs, tracker_id, extra)


def _cached_function_reduced(wrapper: Any) -> Any:
    """A function made by ``functools.lru_cache`` (or ``cache``) that travels by value.

    Pickled as it is by default, it names itself (``__main__.sq``), which a worker or
    another kernel cannot find when it was defined in the notebook or a cell. One that
    cloudpickle would pickle by value if it were a plain function (of ``__main__``, of a
    module shipped by value, or not found under its name) travels as the function it
    wraps, wrapped again with the same ``maxsize`` and ``typed``, and the wrapper's
    attributes. What it cached stays here: the copy starts with an empty cache.
    """
    parameters = getattr(wrapper, "cache_parameters", None)
    if not hasattr(wrapper, "__wrapped__") or parameters is None or _pickled_by_name(wrapper):
        return NotImplemented  # the wrapper's own reduction: by name
    settings = parameters()
    # Its own cache_parameters is made anew by lru_cache (it is a closure of functools).
    state = {k: v for k, v in vars(wrapper).items() if k != "cache_parameters"}
    return (
        _cached_function,
        (wrapper.__wrapped__, settings["maxsize"], settings["typed"]),
        state,
    )


def _cached_function(func: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    """``func`` wrapped by ``functools.lru_cache(maxsize, typed)``, its cache empty."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


def _pickled_by_name(obj: Any) -> bool:
    """Whether cloudpickle would pickle ``obj`` by name, were it a function.

    Found under its module and qualified name, in a module neither ``__main__`` nor
    registered to be pickled by value.
    """
    found = _LOOKUP_MODULE_AND_QUALNAME(obj)
    return found is not None and not _IS_REGISTERED_PICKLE_BY_VALUE(found[0])


def _cached_property_reduced(prop: functools.cached_property[Any]) -> Any:
    """A ``functools.cached_property``, which holds a lock on Python 3.11, without it.

    Rebuilt around its function (pickled as any function is) with a lock of its own, and
    with its ``attrname``: cloudpickle sets a class's attributes one by one, which does
    not call ``__set_name__``. Values already cached in an instance travel with it.
    """
    state = {k: v for k, v in vars(prop).items() if k not in ("func", "lock")}
    return _cached_property, (prop.func, state)


def _cached_property(func: Callable[[Any], Any], state: dict[str, Any]) -> Any:
    """A ``functools.cached_property`` of ``func`` (a new lock), with ``state`` set."""
    prop = functools.cached_property(func)
    vars(prop).update(state)
    return prop


# Private to cloudpickle (3.x): the first item of its reduction of a class by value.
_MAKE_SKELETON_CLASS: Callable[..., type] = cloudpickle.cloudpickle._make_skeleton_class
_CLOUDPICKLE_REDUCER_OVERRIDE: Callable[[Any, Any], Any] = cloudpickle.Pickler.reducer_override
# And how it finds whether it pickles a function by name, or by value.
_LOOKUP_MODULE_AND_QUALNAME: Callable[[Any], Any] = (
    cloudpickle.cloudpickle._lookup_module_and_qualname
)
_IS_REGISTERED_PICKLE_BY_VALUE: Callable[[Any], bool] = (
    cloudpickle.cloudpickle._is_registered_pickle_by_value
)
# The type of what functools.lru_cache makes (private to functools, written in C).
_CACHED_FUNCTION = functools._lru_cache_wrapper


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Cloudpickle's pickler, keeping what it drops of what it pickles by value.

    The file names of code, and the slots of classes; and carrying by value what it
    cannot: ``functools.lru_cache`` functions of the notebook, and
    ``functools.cached_property`` (which holds a lock).
    """

    dispatch_table: ClassVar[collections.ChainMap[Any, Any]] = collections.ChainMap(
        {types.CodeType: _code_keeping_its_file}, cloudpickle.Pickler.dispatch_table
    )

    def reducer_override(self, obj: Any) -> Any:
        """Cloudpickle's, keeping slots and carrying ``functools`` caches by value."""
        if isinstance(obj, type):
            return _with_its_slots(obj, _CLOUDPICKLE_REDUCER_OVERRIDE(self, obj))
        # Exact types compared by identity: little cost for every other object.
        kind = type(obj)
        if kind is _CACHED_FUNCTION:
            return _cached_function_reduced(obj)
        if kind is functools.cached_property:
            return _cached_property_reduced(obj)
        # Called for nearly every object pickled: no super() lookup on the way.
        return _CLOUDPICKLE_REDUCER_OVERRIDE(self, obj)


def dumps(value: object) -> bytes:
    """Serialise ``value`` with cloudpickle (protocol 5), keeping code's file names."""
    buffer = io.BytesIO()
    Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A verified message: its header and its still-serialised body."""

    header: Mapping[str, Any]
    body: Buffer

    def load_body(self) -> Any:
        """Unpickle the body; only reachable for envelopes whose MAC verified."""
        if not self.body:
            return None
        return cloudpickle.loads(self.body)


class Signer:
    """Seals and opens envelopes with a shared secret.

    Parameters
    ----------
    secret
        The signing key. ``None`` is refused unless ``insecure`` is true.
    old_secrets
        Keys still accepted when verifying, so a secret can be rotated without
        losing messages already in flight.
    max_bytes
        Largest envelope sealed or opened.
    insecure
        Sign with a fixed public key when no secret is set (warns).
    """

    def __init__(
        self,
        secret: str | bytes | None,
        *,
        old_secrets: Iterable[str | bytes] = (),
        max_bytes: int = 512 * 1024 * 1024,
        insecure: bool = False,
    ) -> None:
        if secret is None or secret in ("", b""):
            if not insecure:
                raise ConfigurationError(
                    "no secret is set: set NBTASK_SECRET (or pass secret=..., or "
                    "--secret-file FILE to the worker) to the same random string on the "
                    "client and every worker; insecure=True runs without one"
                )
            warnings.warn(
                "nbtask is running with insecure=True: anyone who can write to the broker "
                "can run code on the workers and in this process",
                stacklevel=3,
            )
            secret = INSECURE_KEY
        self._key = _as_bytes(secret)
        self._verify_keys = [self._key, *(_as_bytes(s) for s in old_secrets)]
        self._verify_macs = [_Mac(key) for key in self._verify_keys]
        self._mac = self._verify_macs[0]
        self.max_bytes = max_bytes
        #: The public name of the signing secret, and of every secret accepted.
        self.key_id = key_id(self._key)
        self.accepted_key_ids = tuple(dict.fromkeys(key_id(k) for k in self._verify_keys))

    @classmethod
    def for_settings(cls, settings: Settings, secret: str | None) -> Signer:
        """The signer for ``settings`` (its limits, old secrets, insecure flag) and ``secret``."""
        return cls(
            secret,
            old_secrets=settings.old_secrets,
            max_bytes=settings.max_message_bytes,
            insecure=settings.insecure,
        )

    def seal(self, header: Mapping[str, Any], body: Buffer | Sequence[Buffer] = b"") -> bytes:
        """Encode and sign ``header`` and ``body`` (bytes, or parts joined) into one message."""
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
        head = _encode_header(header).encode()
        size = _PREFIX_SIZE + len(head) + sum(map(len, parts)) + _MAC_SIZE
        if size > self.max_bytes:
            raise TooLarge(
                f"message of {size:,} bytes is over the limit of {self.max_bytes:,} bytes "
                "(max_message_bytes); pass large data by reference (a path or URL) instead"
            )
        prefix = b"".join((MAGIC, bytes((FORMAT_VERSION,)), _LENGTH.pack(len(head)), head))
        # MAC the parts as they are and join once: a large body is copied only once.
        return b"".join((prefix, *parts, self._mac.digest(prefix, *parts)))

    def tag(self, label: bytes) -> bytes:
        """A MAC of ``label`` (a short statement, such as a blob's name and digest).

        Its input is kept apart from every envelope's (which begins with the magic), so a
        tag never passes for a message's MAC, nor the other way round.
        """
        return self._mac.digest(_TAG_PREFIX, label)

    def check_tag(self, label: bytes, tag: Buffer) -> bool:
        """Whether ``tag`` is :meth:`tag` of ``label`` under any secret accepted."""
        return any(
            hmac.compare_digest(mac.digest(_TAG_PREFIX, label), bytes(tag))
            for mac in self._verify_macs
        )

    def open(self, raw: bytes) -> Envelope:
        """Verify ``raw`` and return its envelope; raise before parsing anything unverified.

        Raises
        ------
        TooLarge
            ``raw`` is over ``max_bytes``.
        SignatureError
            ``raw`` is truncated, of another format or version, or its MAC does not match.
        """
        if len(raw) > self.max_bytes:
            raise TooLarge(f"message of {len(raw):,} bytes is over the limit of {self.max_bytes:,}")
        if len(raw) < _MIN_SIZE or raw[: len(MAGIC)] != MAGIC:
            raise SignatureError("not an nbtask message (truncated or of another format)")
        if raw[len(MAGIC)] != FORMAT_VERSION:
            raise SignatureError(
                f"message format version {raw[len(MAGIC)]} is not supported (this nbtask "
                f"speaks {FORMAT_VERSION}); run the same nbtask version on clients and workers"
            )
        # A view, not a copy: a large body is never copied while it is checked.
        unsigned, mac = memoryview(raw)[:-_MAC_SIZE], raw[-_MAC_SIZE:]
        for key in self._verify_macs:
            if hmac.compare_digest(key.digest(unsigned), mac):
                break
        else:
            raise SignatureError(
                "message signature does not verify: it was forged, altered, or signed with "
                "another secret (check that NBTASK_SECRET is the same everywhere)"
            )
        (head_len,) = _LENGTH.unpack_from(unsigned, len(MAGIC) + 1)
        body_start = _PREFIX_SIZE + head_len
        if body_start > len(unsigned):
            raise SignatureError("message header length is past the end of the message")
        try:
            header = _decode_header(str(unsigned[_PREFIX_SIZE:body_start], "utf-8"))
        except ValueError:
            raise SignatureError("message header is not valid JSON") from None
        if not isinstance(header, dict):
            raise SignatureError("message header is not a JSON object")
        return Envelope(header, unsigned[body_start:])


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret
