"""The notebook's logging setup, carried with each cell and back, as a kernel keeps it.

In a kernel, ``logging.basicConfig(level=logging.INFO)`` run once makes every later cell's
``log.info(...)`` show under that cell, in the format given, and
``logging.getLogger("lib").setLevel(logging.ERROR)`` quiets a library. A ``%%task`` cell
runs with the kernel's setup instead of its worker's: the levels of the loggers, whether
they propagate, and the handlers that write to the notebook's output (``sys.stdout``,
``sys.stderr``) with their levels and formats, which write to the cell's output there.
Loggers the notebook turned off (``logger.disabled = True``, as
``logging.config.dictConfig`` does to the loggers it does not name) and the level at and
below which ``logging.disable()`` drops every record are carried too. What the cell
changes of it comes back, as it would stay set in a kernel (``logging.basicConfig`` in the
cell; ``logging.warning()``, which sets up the root logger first). A kernel with nothing
set up shows a logger's warnings and errors as its message alone (logging's last resort),
on the cell's stderr too.

Handlers that write elsewhere (a file on the kernel's machine, the kernel's terminal)
stay the kernel's own. On the worker, its own setup (its log) is put back after each
cell, and nbtask's own records go to the worker's log only, never the cell.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from nbtask.wire.envelope import dumps

__all__ = ["CellLogging", "Setup", "cell_logging", "set_in_kernel", "snapshot"]

#: The kinds of process state this module carries (see :mod:`~nbtask.notebook.process_state`):
#: the loggers' setup, and the level ``logging.disable()`` set (only when not 0).
SETUP, DISABLED_AT = "logging", "logging.disable"

#: A handler writing to the notebook's output: ``stdout`` or ``stderr``, its level, and
#: its format (the format string, date format and style; ``None``: logging's default), and
#: its formatter pickled when it is not logging's own class (a JSON formatter), else b"".
HandlerSpec = tuple[str, int, str | None, str | None, str, bytes]
#: A logger's level, whether it propagates, its handlers writing to the output, and
#: whether it is turned off (``logger.disabled``).
LoggerSpec = tuple[int, bool, tuple[HandlerSpec, ...], bool]
#: Every logger that differs from a fresh one, by name (``""``: the root logger).
Setup = dict[str, LoggerSpec]

#: A fresh kernel's: the root logger at WARNING with no handler, no other logger set.
_FRESH: Setup = {"": (logging.WARNING, True, (), False)}
_UNSET: LoggerSpec = (logging.NOTSET, True, (), False)
_STYLES = {logging.PercentStyle: "%", logging.StrFormatStyle: "{", logging.StringTemplateStyle: "$"}


class _OutputHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to this process's ``sys.stdout`` or ``sys.stderr`` as it is now.

    Looked up at each record, so on a worker it writes to the output of the cell that
    logs, whichever that is.
    """

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    @property
    def stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self.output)
        return stream

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # (StreamHandler.__init__ sets it): always the current one


def snapshot() -> dict[str, Any]:
    """The logging setup of this process, as a cell carries it (nbtask's own left out).

    By kind: :data:`SETUP`, and :data:`DISABLED_AT` when ``logging.disable()`` is in force
    (a kernel's state pickles the same as before while it is not).
    """
    state: dict[str, Any] = {SETUP: _setup_of(_set_loggers())}
    if logging.root.manager.disable:
        state[DISABLED_AT] = logging.root.manager.disable
    return state


def _set_loggers() -> list[tuple[str, logging.Logger]]:
    """The loggers set otherwise than fresh ones, by name, the root one (``""``) first.

    One pass with no call per logger: most of a process's loggers are not set, and they
    are all looked at for every cell (by the kernel sending it, by the worker before and
    after running it).
    """
    found: list[tuple[str, logging.Logger]] = [("", logging.root)]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (
            logger.level or logger.handlers or not logger.propagate or logger.disabled
        ):
            found.append((name, logger))
    return found


def _setup_of(loggers: list[tuple[str, logging.Logger]]) -> Setup:
    setup: Setup = {}
    for name, logger in loggers:
        if not _nbtask_own(name):
            spec = _logger_spec(logger)
            if spec != _UNSET or name == "":
                setup[name] = spec
    return setup


def _nbtask_own(name: str) -> bool:
    return name == "nbtask" or name.startswith("nbtask.")


def _logger_spec(logger: logging.Logger) -> LoggerSpec:
    handlers = (_handler_spec(h) for h in logger.handlers)
    kept = tuple(h for h in handlers if h is not None)
    return logger.level, logger.propagate, kept, logger.disabled


def _handler_spec(handler: logging.Handler) -> HandlerSpec | None:
    """How ``handler`` writes to the notebook's output; ``None`` if it writes elsewhere.

    Any stream handler writing to ``sys.stdout`` or ``sys.stderr`` (a library's subclass
    too) writes to the cell's output, with its formatter; its other behaviour and its
    filters stay the kernel's.
    """
    if isinstance(handler, _OutputHandler):
        output = handler.output
    elif not isinstance(handler, logging.StreamHandler):
        return None
    elif handler.stream is sys.stdout:
        output = "stdout"
    elif handler.stream is sys.stderr:
        output = "stderr"
    else:
        return None
    formatter = handler.formatter
    if formatter is None:
        return output, handler.level, None, None, "%", b""
    style = _STYLES.get(type(formatter._style), "%")
    custom = b"" if type(formatter) is logging.Formatter else _pickled(formatter)
    return output, handler.level, formatter._fmt, formatter.datefmt, style, custom


def _pickled(formatter: logging.Formatter) -> bytes:
    try:
        return dumps(formatter)
    except Exception:  # its format string still travels
        return b""


def _handler(spec: HandlerSpec) -> logging.Handler:
    output, level, fmt, datefmt, style, custom = spec
    handler = _OutputHandler(output)
    handler.setLevel(level)
    formatter: logging.Formatter | None = None
    if custom:
        with contextlib.suppress(Exception):  # its class cannot be loaded here
            formatter = pickle.loads(custom)
    if formatter is None and fmt is not None:
        formatter = logging.Formatter(fmt, datefmt, style)  # type: ignore[arg-type]
    handler.setFormatter(formatter)
    return handler


def _set(logger: logging.Logger, spec: LoggerSpec) -> None:
    """Make ``logger`` as ``spec`` says, keeping its handlers that write elsewhere.

    Its level is set as an attribute: :meth:`logging.Logger.setLevel` clears every
    logger's cache each time; the caller clears them once (:func:`_levels_changed`).
    """
    level, propagate, wanted, *disabled = spec  # (an older kernel's has no ``disabled``)
    logger.level = level
    logger.propagate = propagate
    logger.disabled = bool(disabled and disabled[0])
    elsewhere = [h for h in logger.handlers if _handler_spec(h) is None]
    present = {_handler_spec(h): h for h in logger.handlers}
    logger.handlers = elsewhere + [present.get(h) or _handler(h) for h in wanted]


def _levels_changed() -> None:
    logging.root.manager._clear_cache()  # type: ignore[attr-defined]


def _logger(name: str) -> logging.Logger:
    return logging.root if name == "" else logging.getLogger(name)


def _name(logger: logging.Logger) -> str:
    return "" if logger is logging.root else logger.name


def set_in_kernel(changed: Mapping[str, Any]) -> None:
    """Set in this kernel the logging a cell changed (a cell's state changes), as it left it."""
    if SETUP not in changed and DISABLED_AT not in changed:
        return
    for name, spec in changed.get(SETUP, {}).items():
        _set(_logger(name), spec)
    if DISABLED_AT in changed:
        logging.root.manager.disable = changed[DISABLED_AT]
    _levels_changed()


class CellLogging:
    """A cell's logging setup on a worker: its kernel's while it runs, then the worker's.

    ``given``: its kernel's loggers; ``disabled_at``: the level its kernel's
    ``logging.disable()`` set (0: none). ``changed``: the loggers the cell changed, as it
    left them (empty if none); ``disabled_after``: the level it left set, if it changed it.
    """

    def __init__(self, given: Setup, disabled_at: int = 0) -> None:
        self.given = given
        self.disabled_at = disabled_at
        self.changed: Setup = {}
        self.disabled_after: int | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Run the cell with its kernel's setup; put the worker's own back after it.

        Every logger is put back as it was before the cell (one the cell made, or a library
        it imported set up, is left unset but for its ``NullHandler``): nothing a cell sets
        up reaches the next task, which may be another notebook's. What the cell changed
        comes back to its own kernel (:attr:`changed`), which sends it with its next cells.
        """
        ours = logging.getLogger("nbtask")
        named = [logging.root, *(_logger(n) for n in self.given if n), ours]
        own = {id(lg): (lg, _as_it_is(lg)) for lg in named}
        # The worker's own loggers the setup given does not name: put back as they are too.
        unnamed = _others_set(own)
        own.update({id(lg): (lg, _as_it_is(lg)) for _, lg in unnamed})
        manager = logging.root.manager
        own_disabled_at = manager.disable
        # nbtask's records go on to the worker's log only, at the worker's level.
        ours.handlers = [*ours.handlers, *logging.root.handlers]
        ours.propagate = False
        if ours.level == logging.NOTSET:
            ours.level = logging.root.level
        logging.root.handlers = []
        before: Setup | None = None
        try:
            manager.disable = self.disabled_at
            for name, spec in self.given.items():
                _set(_logger(name), spec)
            _levels_changed()
            # What the cell starts from: the setup given, and the worker's loggers it does
            # not name.
            given = {n: _logger_spec(_logger(n)) for n in self.given}
            before = {**_setup_of(unnamed), **given}
            yield
        finally:
            # As the cell left them, read before they are put back: those set before it...
            left = _setup_of([(_name(lg), lg) for lg, _ in own.values()])
            disabled_after = manager.disable
            manager.disable = own_disabled_at
            for logger, (level, propagate, handlers, disabled) in own.values():
                logger.level, logger.propagate, logger.handlers = level, propagate, handlers
                logger.disabled = disabled
            # ...and those it set up anew, unset now but for their null handlers.
            new = _others_set(own)
            if before is not None:
                after = {**left, **_setup_of(new)}
                self.changed = {n: s for n, s in after.items() if before.get(n) != s}
                self.changed.update({n: _UNSET for n in before.keys() - after.keys()})
                if disabled_after != self.disabled_at:
                    self.disabled_after = disabled_after
            for _, logger in new:
                logger.level, logger.propagate, logger.disabled = logging.NOTSET, True, False
                logger.handlers = [h for h in logger.handlers if type(h) is logging.NullHandler]
            _levels_changed()

    def changes(self) -> dict[str, Any]:
        """The cell's changes to the process state that concern logging (see there)."""
        # Not part of the state a process stays in between cells: put back after each.
        changes: dict[str, Any] = {SETUP: self.changed} if self.changed else {}
        if self.disabled_after is not None:
            changes[DISABLED_AT] = self.disabled_after
        return changes


#: A logger as it is, to put back whole: level, propagate, its handlers, disabled.
_Whole = tuple[int, bool, list[logging.Handler], bool]


def _as_it_is(logger: logging.Logger) -> _Whole:
    return logger.level, logger.propagate, list(logger.handlers), logger.disabled


def _others_set(known: Mapping[int, Any]) -> list[tuple[str, logging.Logger]]:
    """The loggers set otherwise than fresh ones (:func:`_set_loggers`) but those ``known``."""
    return [(name, logger) for name, logger in _set_loggers() if id(logger) not in known]


def cell_logging(state: Mapping[str, Any]) -> CellLogging:
    """The logging of a cell whose kernel's state is ``state`` (an older kernel's: fresh)."""
    given = state.get(SETUP)
    return CellLogging(dict(_FRESH if given is None else given), state.get(DISABLED_AT, 0))
