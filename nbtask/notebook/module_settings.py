"""Settings of matplotlib, pandas, numpy and decimal as snapshots, and setting them back.

matplotlib's rcParams, the inline backend's figure formats, pandas' options, numpy's print
options and error handling, and the ``decimal`` module's context (its precision, rounding,
exponent limits and traps: ``getcontext().prec = 50`` changes every later result).

A snapshot is taken in the kernel for every cell it ships and on the worker after every
cell; reading every setting anew costs more than a trivial cell's own work (pandas' 75
options about 0.3 ms, rcParams 0.1 ms). Between cells they rarely change, so the last snapshot is
given again while the settings still compare equal to it, which is checked against
pandas' own store and the rcParams dict in a fraction of that.
"""

from __future__ import annotations

import contextlib
import copy
import decimal
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

__all__ = [
    "NUMPY_ERRORS_DEFAULTS",
    "NUMPY_PRINT_DEFAULTS",
    "decimal_context",
    "inline_backend",
    "numpy_print_options",
    "pandas_defaults",
    "pandas_options",
    "rc_params",
    "registered_options",
    "same",
    "set_decimal_context",
    "set_inline_backend",
    "set_numpy_errors",
    "set_numpy_print_options",
    "set_pandas_options",
    "set_rc_params",
]

#: numpy's print options and floating-point error handling in a fresh process, as its
#: documentation gives them (numpy keeps no public copy; a key this numpy lacks is left).
NUMPY_PRINT_DEFAULTS: dict[str, Any] = {
    "edgeitems": 3,
    "threshold": 1000,
    "floatmode": "maxprec",
    "precision": 8,
    "suppress": False,
    "linewidth": 75,
    "nanstr": "nan",
    "infstr": "inf",
    "sign": "-",
    "formatter": None,
    "legacy": False,
    "override_repr": None,
}
NUMPY_ERRORS_DEFAULTS = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}


def same(a: Any, b: Any) -> bool:
    """True if two settings' values are equal, numpy arrays and unpicklable values too.

    One object is the same as itself: a snapshot given again (see :class:`_Snapshots`)
    is not compared item by item.
    """
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # numpy arrays inside (numpy.random's state)
        pass
    if isinstance(a, tuple) and isinstance(b, tuple):  # numpy.random's: item by item
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if _plain_arrays(a, b):
        # By dtype, shape and bytes, as their pickles would be compared, without them.
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    # Pickles compare arrays by dtype, shape and bytes, in microseconds (their reprs took
    # milliseconds); a value that cannot be pickled is compared by its repr.
    try:
        return pickle.dumps(a, protocol=5) == pickle.dumps(b, protocol=5)
    except Exception:
        return repr(a) == repr(b)


def _plain_arrays(a: Any, b: Any) -> bool:
    """Whether both are numpy arrays of values (an object array's bytes are pointers)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(a) is not numpy.ndarray or type(b) is not numpy.ndarray:
        return False
    return not (a.dtype.hasobject or b.dtype.hasobject)


def _read_rc_params(params: Any) -> dict[str, Any]:
    """The validated values an RcParams stores, the backend left out (the process's own).

    Read as ``RcParams.copy`` reads them, without the per-key lookup of ``rcParams[key]``
    (ten times slower). Lists and cyclers are copied: a snapshot sharing them with the
    live settings would miss a cell's ``rcParams["font.sans-serif"].insert(0, ...)``, or
    ``+=`` on ``axes.prop_cycle`` (which rebinds its parts: a shallow copy keeps the old),
    or its ``change_key`` (which changes the cyclers it is made of, and their keys).
    """
    kept = _rc_kept(_rc_raw(params) or params)
    kept.pop("backend", None)
    return kept


def _copied(value: Any) -> Any:
    """A copy sharing nothing with ``value``, through a pickle (``copy.deepcopy``: 5x)."""
    return pickle.loads(pickle.dumps(value, protocol=5))


def set_rc_params(matplotlib: Any, params: Mapping[str, Any]) -> None:
    """Make ``matplotlib.rcParams`` what ``params`` (an :data:`rc_params` snapshot) says."""
    current = rc_params(matplotlib.rcParams)
    if same(current, params):  # as is usual between cells: nothing to validate
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated keys some styles still carry
        for key, value in params.items():
            # Only what differs: validating every key again costs more than the cell.
            if key in current and same(current[key], value):
                continue
            with contextlib.suppress(KeyError, ValueError, TypeError):
                matplotlib.rcParams[key] = copy.deepcopy(value)


def registered_options(pandas: Any) -> dict[str, Any]:
    """The registry of pandas' options, ``{key: RegisteredOption}`` (empty if it moved)."""
    config = getattr(getattr(pandas, "_config", None), "config", None)
    return dict(getattr(config, "_registered_options", {}))


def _option_reader(pandas: Any) -> Callable[[str], Any]:
    """How to read one pandas option by its full name, as ``pandas.get_option`` reads it.

    ``get_option`` first matches its argument as a pattern against every option, about
    10 µs each (some 75 of them, on every cell, in the kernel and on the worker); its
    value is the one under the option's key (or its replacement's) in pandas' nested
    dict, read here directly. With another layout of pandas' internals, ``get_option``.
    """
    config = getattr(getattr(pandas, "_config", None), "config", None)
    get_root = getattr(config, "_get_root", None)
    translate = getattr(config, "_translate_key", None)
    if not callable(get_root) or not callable(translate):
        return cast("Callable[[str], Any]", pandas.get_option)

    def read(key: str) -> Any:
        root, leaf = get_root(translate(key))
        return root[leaf]

    return read


def _read_pandas_options(pandas: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    read = _option_reader(pandas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading an option deprecated in this pandas warns
        for key in registered_options(pandas):
            with contextlib.suppress(Exception):
                value = read(key)
                # One a cell can change in place (a dict of styler.format.formatter) is
                # copied, as rcParams' lists are: else the snapshot would change with it.
                options[key] = copy.deepcopy(value) if type(value) in (dict, list) else value
    return options


def pandas_defaults(pandas: Any) -> dict[str, Any]:
    """Every option's default, as ``pandas.reset_option("all")`` puts them back."""
    registered = registered_options(pandas)
    return {k: o.defval for k, o in registered.items() if hasattr(o, "defval")}


def set_pandas_options(pandas: Any, options: Mapping[str, Any]) -> None:
    """Set the options ``options`` names that differ (an option this pandas lacks: none)."""
    current = pandas_options(pandas)  # as is usual between cells: the last snapshot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # options deprecated in this pandas
        for key, value in options.items():
            if key in current and same(current[key], value):
                continue
            with contextlib.suppress(Exception):  # an option this pandas lacks
                pandas.set_option(key, copy.deepcopy(value))


#: The inline backend's settings that make a figure's image (``%config InlineBackend....``).
_INLINE_SETTINGS = ("figure_formats", "print_figure_kwargs")


def inline_backend(shell: Any) -> dict[str, Any] | None:
    """The inline backend's figure formats and print arguments in ``shell``'s process.

    Its own once it is set up (once a figure was shown), those that are not its defaults;
    before, what ``%config`` gave it in the shell's config, which it is set up from.
    ``None``: neither. A backend set up at its defaults is as one not set up: a worker's
    that a cell set up (to show a figure) does not come back as a change.
    """
    backend = _set_up_inline_backend()
    if backend is not None:
        instance, traits = backend.instance(), backend.class_traits()
        own = {name: getattr(instance, name) for name in _INLINE_SETTINGS}
        return {
            name: copy.deepcopy(value)
            for name, value in own.items()
            if not same(value, traits[name].default())
        } or None
    section = shell.config.get("InlineBackend", {}) if shell is not None else {}
    given = {name: copy.deepcopy(section[name]) for name in _INLINE_SETTINGS if name in section}
    if section.get("figure_format") and _set_later(section, "figure_format", "figure_formats"):
        given["figure_formats"] = {section["figure_format"]}  # the older name
    if "figure_formats" in given:
        given["figure_formats"] = set(given["figure_formats"])  # as the backend holds them
    return given or None


def _set_later(section: Mapping[str, Any], name: str, other: str) -> bool:
    """Whether ``name`` was put in a config section after ``other`` (or ``other`` is not there).

    The backend takes its traits from the section in that order, so of ``figure_format``
    and ``figure_formats`` the one put there last wins.
    """
    keys = list(section)
    return other not in keys or keys.index(name) > keys.index(other)


def set_inline_backend(shell: Any, settings: Mapping[str, Any] | None) -> None:
    """Give the inline backend ``settings`` (a key left out, or ``None``: its defaults).

    Set up already, it selects the shell's figure formatters anew; else they go into the
    shell's config, which it is set up from when the first figure is shown (as ``%config``
    before that does). Nothing here imports matplotlib.
    """
    settings = settings or {}
    backend = _set_up_inline_backend()
    if backend is not None:
        instance, traits = backend.instance(), backend.class_traits()
        for name in _INLINE_SETTINGS:
            value = settings.get(name, traits[name].default())
            if not same(getattr(instance, name), value):
                with contextlib.suppress(Exception):  # a format it cannot make here (jpeg)
                    setattr(instance, name, copy.deepcopy(value))
    elif shell is not None and inline_backend(shell) != (dict(settings) or None):
        section = shell.config.InlineBackend
        for name in (*_INLINE_SETTINGS, "figure_format"):
            section.pop(name, None)
        section.update(copy.deepcopy(dict(settings)))


def _set_up_inline_backend() -> Any:
    """matplotlib_inline's ``InlineBackend`` once set up in this process, else ``None``."""
    backend = getattr(sys.modules.get("matplotlib_inline.config"), "InlineBackend", None)
    return backend if backend is not None and backend.initialized() else None


def set_numpy_print_options(numpy: Any, options: Mapping[str, Any]) -> None:
    """Make numpy's print options what ``options`` says (a key this numpy lacks: none).

    All at once, the others as they are: ``set_printoptions`` puts ``formatter`` and
    ``override_repr`` back to ``None`` unless given, so a call naming only the keys that
    differ would lose them.
    """
    current = numpy_print_options(numpy)
    wanted = {k: options.get(k, v) for k, v in current.items()}
    if not same(current, wanted):  # as is usual between cells: nothing to set
        # A copy of the formatters: ``options`` stays as it was, whatever a cell does.
        numpy.set_printoptions(**{**wanted, "formatter": _formatters(wanted.get("formatter"))})


def numpy_print_options(numpy: Any) -> dict[str, Any]:
    """The print options, as ``numpy.get_printoptions`` gives them, the formatters copied.

    numpy gives its own dict of formatters: a snapshot sharing it would change with it.
    """
    options = dict(numpy.get_printoptions())
    if "formatter" in options:
        options["formatter"] = _formatters(options["formatter"])
    return options


def _formatters(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def set_numpy_errors(numpy: Any, errors: Mapping[str, Any]) -> None:
    """Make numpy's floating-point error handling what ``errors`` (``geterr()``) says."""
    current = numpy.geterr()
    wanted = {k: errors.get(k, v) for k, v in current.items()}
    if wanted != current:
        numpy.seterr(**wanted)


#: The settings of a decimal context a snapshot holds (not its flags: what a cell raised).
_DECIMAL_SETTINGS = ("prec", "rounding", "Emin", "Emax", "capitals", "clamp")


#: The signals a context traps or not, each with its name, by name: a snapshot's
#: ``traps`` list in order without sorting it (every context has each of them).
_SIGNALS = sorted(((s, s.__name__) for s in decimal.Context().traps), key=lambda sn: sn[1])


def decimal_context() -> dict[str, Any]:
    """The ``decimal`` context of this thread as plain values: settings, trapped signals."""
    context = decimal.getcontext()
    traps = context.traps
    # Read one by one, as every snapshot does twice a cell: a loop of getattr took twice as long.
    return {
        "prec": context.prec,
        "rounding": context.rounding,
        "Emin": context.Emin,
        "Emax": context.Emax,
        "capitals": context.capitals,
        "clamp": context.clamp,
        "traps": [name for signal, name in _SIGNALS if traps[signal]],
    }


def set_decimal_context(settings: Mapping[str, Any]) -> None:
    """Make this thread's ``decimal`` context what ``settings`` says (its flags stay)."""
    context = decimal.getcontext()
    for name in _DECIMAL_SETTINGS:
        if name in settings and getattr(context, name) != settings[name]:
            setattr(context, name, settings[name])
    if "traps" in settings:
        trapped = set(settings["traps"])
        traps = context.traps
        for signal, name in _SIGNALS:
            if traps[signal] != (name in trapped):  # (as usual: none differs)
                traps[signal] = name in trapped


class _Snapshots:
    """The last snapshot of one store of settings, given again while the store equals it.

    ``read(source)`` makes a snapshot; ``raw(source)`` gives the store's values in the
    form ``kept(raw)`` copies and keeps beside the snapshot (without ``kept``: the
    snapshot is that copy), to be compared with ``==`` at the next call (``None``: a
    layout not known here, read each time). A snapshot given again is the same dict, to
    be read, never changed: a caller comparing it with the one it had finds it by identity.
    """

    def __init__(
        self,
        read: Callable[[Any], dict[str, Any]],
        raw: Callable[[Any], Any],
        kept: Callable[[Any], Any] | None = None,
    ) -> None:
        self._read = read
        self._raw = raw
        self._kept = kept
        # Source, kept raw values and snapshot in one attribute: a thread never sees the
        # halves of two different reads.
        self._last: tuple[Any, Any, dict[str, Any]] | None = None

    def __call__(self, source: Any) -> dict[str, Any]:
        raw = self._raw(source)
        if raw is None:
            return self._read(source)
        last = self._last
        if last is not None and last[0] is source and _equal(raw, last[1]):
            return last[2]
        snapshot = self._read(source)
        kept = snapshot if self._kept is None else self._kept(raw)
        self._last = (source, kept, snapshot)
        return snapshot


def _equal(raw: Any, kept: Any) -> bool:
    try:
        # A dict's own comparison, in C, for a subclass too: RcParams compares as a
        # Mapping otherwise, item by item through its validating lookups.
        return (dict.__eq__(raw, kept) if isinstance(raw, dict) else raw == kept) is True
    except Exception:  # a value that does not compare (an array): read it again
        return False


def _rc_raw(params: Any) -> dict[str, Any] | None:
    # The live store itself, compared without a copy; the backend stays in the values
    # kept for that, only the snapshot leaves it out.
    return cast("dict[str, Any]", params) if isinstance(params, dict) else None


def _rc_kept(raw: Mapping[str, Any]) -> dict[str, Any]:
    # Lists and cyclers copied: one a cell changes in place no longer equals its copy.
    cycler = getattr(sys.modules.get("cycler"), "Cycler", None)
    items = dict.items(raw) if isinstance(raw, dict) else raw.items()
    return {
        k: list(v) if type(v) is list else _copied(v) if type(v) is cycler else v for k, v in items
    }


def _pandas_raw(pandas: Any) -> dict[str, Any] | None:
    """Pandas' nested dict of option values (``None`` if it moved)."""
    config = getattr(getattr(pandas, "_config", None), "config", None)
    store = getattr(config, "_global_config", None)
    return store if isinstance(store, dict) else None


def _pandas_kept(value: Any) -> Any:
    # Nested dicts copied all the way down, and lists (as the snapshot copies them).
    if type(value) is dict:
        return {k: _pandas_kept(v) for k, v in value.items()}
    return copy.deepcopy(value) if type(value) is list else value


#: The settings as they are now, as dicts: ``rc_params(matplotlib.rcParams)`` (the backend
#: left out: it is each process's own), ``pandas_options(pandas)`` (every option by key).
rc_params = _Snapshots(_read_rc_params, _rc_raw, _rc_kept)
pandas_options = _Snapshots(_read_pandas_options, _pandas_raw, _pandas_kept)
