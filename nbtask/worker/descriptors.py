"""What a task's process writes to its file descriptors 1 and 2, as the task's output.

In a Jupyter kernel, what is written to the kernel process's descriptors 1 and 2 shows in
the running cell: the output of ``os.system`` or of a subprocess run without capturing it,
C code's ``printf``, ``faulthandler``'s dumps (ipykernel points the descriptors at pipes a
thread of its own reads). A task that asks for it (``Task.output_descriptors``, set for
``%%task`` cells) gets the same on a worker: while its code runs, descriptors 1 and 2 of
the worker's child process are the write ends of two pipes made for that run. One thread
per process, started at the first such run, reads them into the task's stdout and
stderr; text the task writes through ``sys.stdout``/``sys.stderr`` first takes what the
pipes hold, so it comes out in the order it was written (a kernel reads its pipes apart
from the cell's prints, and may show them out of order). C's own buffers are flushed
when the run ends, so a C extension's ``printf`` shows in its cell, not in a later one.

When the code ends, whichever way (it returned, raised, was stopped or ran out of time:
the runner ends the capture only once no interrupt can be raised), descriptors 1 and 2
are given back what they were and what the pipes hold goes to the task. A process the
task started and left running may still hold a pipe: what it writes later goes to the
worker's log, where such output went before, never into a later task's output; the pipe
is closed once it has no writer left. (Hence new pipes for each run, a few tens of
microseconds: one kept from run to run could not tell what a process left running writes
from what the next task writes.) The worker's own log lines never pass through the
pipes: its logging handlers that wrote to descriptor 1 or 2 write, from the first capture
on, to copies of those made before it, and so does ``faulthandler`` if the worker enabled
it (a crash's traceback must reach the log, not a pipe no one reads any more).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import faulthandler
import fcntl
import functools
import logging
import os
import select
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from nbtask.wire.events import EventType
from nbtask.worker.wakeup import Bell

__all__ = ["DescriptorOutput", "OutputSink"]

log = logging.getLogger("nbtask.worker")

_TARGETS = ((1, EventType.STDOUT), (2, EventType.STDERR))
_CHUNK = 64 * 1024
#: Each pipe's capacity, where the system lets a process set it. C code that writes while
#: holding the GIL blocks once a pipe is full (the reading thread waits for the GIL): a
#: large pipe makes that rare, as wurlitzer does.
_PIPE_BYTES = 1024 * 1024
_SET_PIPE_SIZE = getattr(fcntl, "F_SETPIPE_SZ", None)  # (Linux's)
#: Reads that take what a pipe held before a print or the run's end: its capacity, and
#: one to see it empty (or ended).
_PENDING_READS = _PIPE_BYTES // _CHUNK + 1
_utf8 = codecs.getincrementaldecoder("utf-8")


class OutputSink(Protocol):
    """Where the running task's text goes (the child's outbox)."""

    def write(self, kind: EventType, text: str) -> bool:
        """Queue ``text`` as the running task's ``kind`` output; False if none runs."""

    def own_thread(self, ident: int) -> None:
        """Never take thread ``ident`` for one the running task left running."""


class _Pipe:
    """One pipe standing for descriptor ``target`` during a run (and after, if held)."""

    __slots__ = ("decoder", "kind", "open", "read", "target", "task", "watched")

    def __init__(self, read: int, target: int, kind: EventType) -> None:
        self.read, self.target, self.kind = read, target, kind
        self.decoder = _utf8(errors="replace")  # (a character may span two reads)
        self.task = True  # False once the run ended: what comes then goes to the log
        self.open = True
        self.watched = False  # by the reading thread


class _Watch:
    """The pipes the reading thread waits on.

    Linux's epoll: a pipe added while the thread waits is seen at once, no thread woken.
    Elsewhere poll, whose waiting thread a bell wakes to see a pipe added.
    """

    def __init__(self) -> None:
        self._bell: Bell | None = None
        self._poll: Any
        if hasattr(select, "epoll"):
            self._poll, self._readable = select.epoll(), select.EPOLLIN
        else:
            self._poll, self._readable, self._bell = select.poll(), select.POLLIN, Bell()
            self._poll.register(self._bell.fileno(), select.POLLIN)

    def add(self, fd: int) -> None:
        """Wait on ``fd`` too."""
        self._poll.register(fd, self._readable)
        if self._bell is not None:
            self._bell.ring()

    def remove(self, fd: int) -> None:
        """No longer wait on ``fd`` (before it is closed)."""
        self._poll.unregister(fd)

    def ready(self) -> bool:
        """Whether some pipe may hold something now (where it cannot tell: True)."""
        return self._bell is not None or bool(self._poll.poll(0))  # (epoll: any thread)

    def wait(self) -> list[int]:
        """Block until some of the pipes can be read (or have ended): those."""
        ready = [fd for fd, _ in self._poll.poll()]
        if self._bell is not None and self._bell.fileno() in ready:
            self._bell.drain()
            ready.remove(self._bell.fileno())
        return ready


class DescriptorOutput:
    """Descriptors 1 and 2 of a worker's child into the running task's output, on demand.

    Parameters
    ----------
    sink
        Queues the task's text (the child's outbox).
    originals
        The streams the child's ``sys.stdout`` and ``sys.stderr`` were (the worker's
        log): flushed around each capture, and the logging handlers that write to them
        are moved to copies of their descriptors.
    """

    def __init__(self, sink: OutputSink, originals: Sequence[Any]) -> None:
        self._sink = sink
        self._originals = _unique([*originals, sys.__stdout__, sys.__stderr__])
        # Taken by the reading thread for each read and by the task's text for its place.
        self._lock = threading.RLock()
        self._pipes: dict[int, _Pipe] = {}  # read end -> pipe: the run's, and those held
        self._current: list[_Pipe] = []  # the running task's (none between runs)
        self._saved: dict[int, int] = {}  # 1, 2 -> copies of what they were, made once
        self._watch: _Watch | None = None  # made at the first capture, with its thread
        self._reading = False  # the reading thread has read what it has not passed on yet
        #: Whether a task's run has descriptors 1 and 2 now.
        self.capturing = False
        self._forked = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _disown(ref()))

    def start(self) -> None:
        """Make descriptors 1 and 2 the running task's until :meth:`end`.

        The first call starts the reading thread and moves the log's handlers. In a process
        forked from the child, nothing happens. If the pipes cannot be made (no descriptor
        left), the log says so and the output goes there, as a function task's does.
        """
        if self._forked or self.capturing:
            return
        if self._watch is None:
            self._first_use()
        _flush(self._originals)  # (what was written before is not the task's)
        pipes: list[_Pipe] = []
        try:
            for target, kind in _TARGETS:
                pipes.append(self._pipe_onto(target, kind))
        except OSError as exc:
            for pipe in pipes:
                os.dup2(self._saved[pipe.target], pipe.target)
                os.close(pipe.read)
            log.warning("cannot capture the task's descriptors 1 and 2 (%s): this log has it", exc)
            return
        with self._lock:
            for pipe in pipes:
                self._pipes[pipe.read] = pipe
                self._watched(pipe, True)
            self._current, self.capturing = pipes, True

    def end(self) -> None:
        """Give descriptors 1 and 2 back, and the task what its pipes still hold."""
        if not self.capturing:
            return
        _flush(self._originals)  # (into the pipes: written by the task)
        with self._lock:
            current, self._current, self.capturing = self._current, [], False
            for pipe in current:  # (else their end, just below, would wake the thread)
                self._watched(pipe, False)
            for pipe in current:  # closes the pipes' write ends that 1 and 2 were
                os.dup2(self._saved[pipe.target], pipe.target)
            for pipe in current:  # (what a process left running writes meanwhile: later)
                self._take_all(pipe, _PENDING_READS)
                tail = pipe.decoder.decode(b"", final=True)
                if tail:
                    self._deliver(pipe, tail)
                pipe.task = False
                if pipe.open:  # a process the task left running holds it: to the log
                    self._watched(pipe, True)

    def write(self, kind: EventType, text: str) -> bool:
        """Queue text the task wrote through ``sys.stdout``/``sys.stderr``, in its place.

        What the pipes hold, written before, goes first. False if no task runs.
        """
        watch = self._watch
        # Most text comes with nothing in the pipes: no lock. Something read from them
        # but not yet passed on (by the reading thread) is waited for: it comes first.
        if watch is None or not (watch.ready() or self._reading):
            return self._sink.write(kind, text)
        with self._lock:
            for pipe in self._current:
                self._take_all(pipe, _PENDING_READS)
            return self._sink.write(kind, text)

    # Setting up --------------------------------------------------------------------------
    def _first_use(self) -> None:
        self._saved = {target: os.dup(target) for target, _ in _TARGETS}
        self._log_to_copies()
        if faulthandler.is_enabled():  # the worker's own crash, in its log (-X faulthandler)
            faulthandler.enable(self._saved[2])
        self._watch = _Watch()
        thread = threading.Thread(target=self._read_forever, name="nbtask-descriptors")
        thread.daemon = True
        thread.start()
        assert thread.ident is not None
        self._sink.own_thread(thread.ident)  # started during a task, not by it

    def _log_to_copies(self) -> None:
        """Point the logging handlers that write to descriptor 1 or 2 at their copies."""
        copies: dict[int, Any] = {}
        originals = {id(stream) for stream in self._originals}
        for handler in _handlers():
            if not isinstance(handler, logging.StreamHandler):
                continue
            stream: Any = handler.stream
            if id(stream) not in originals:
                continue
            try:
                target = stream.fileno()
            except (OSError, ValueError, AttributeError):
                continue
            if target not in self._saved:
                continue
            if target not in copies:
                encoding = getattr(stream, "encoding", None) or "utf-8"
                copies[target] = open(  # noqa: SIM115 - the handler's for the process's life
                    self._saved[target],
                    "w",
                    encoding=encoding,
                    errors="backslashreplace",
                    buffering=1,
                    closefd=False,
                )
            handler.setStream(copies[target])

    def _pipe_onto(self, target: int, kind: EventType) -> _Pipe:
        read, write = os.pipe()
        try:
            if _SET_PIPE_SIZE is not None:
                with contextlib.suppress(OSError):  # (over the system's limit: as it is)
                    fcntl.fcntl(write, _SET_PIPE_SIZE, _PIPE_BYTES)
            os.set_blocking(read, False)
            os.dup2(write, target)  # (inheritable: subprocesses write to it)
        except OSError:
            os.close(read)
            raise
        finally:
            os.close(write)
        return _Pipe(read, target, kind)

    def _watched(self, pipe: _Pipe, watched: bool) -> None:
        """Have the reading thread wait on ``pipe``, or no longer."""
        watch = self._watch
        assert watch is not None
        if not pipe.open or pipe.watched == watched:
            return
        if watched:
            watch.add(pipe.read)
        else:
            watch.remove(pipe.read)
        pipe.watched = watched

    # Reading (lock held) -----------------------------------------------------------------
    def _read_forever(self) -> None:
        watch = self._watch
        assert watch is not None
        while True:
            for fd in watch.wait():
                try:
                    with self._lock:
                        pipe = self._pipes.get(fd)  # (closed meanwhile: gone)
                        if pipe is not None:
                            self._reading = True  # (before the read: see write())
                            try:
                                self._take(pipe)
                            finally:
                                self._reading = False
                except Exception:  # never the end of the reading thread
                    log.exception("could not read a task's descriptor output")

    def _take_all(self, pipe: _Pipe, reads: int) -> None:
        """Read what ``pipe`` holds, at most ``reads`` times."""
        while reads and self._take(pipe):
            reads -= 1

    def _take(self, pipe: _Pipe) -> bool:
        """Read once from ``pipe`` and pass it on; False if it held nothing or has ended."""
        if not pipe.open:
            return False
        try:
            data = os.read(pipe.read, _CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # no writer left
            self._close(pipe)
            return False
        if pipe.task:
            self._deliver(pipe, pipe.decoder.decode(data))
        else:
            _write_all(self._saved[pipe.target], data)
        return True

    def _deliver(self, pipe: _Pipe, text: str) -> None:
        if text and not self._sink.write(pipe.kind, text):  # (no task: to the log)
            _write_all(self._saved[pipe.target], text.encode(errors="backslashreplace"))

    def _close(self, pipe: _Pipe) -> None:
        self._watched(pipe, False)
        pipe.open = False
        self._pipes.pop(pipe.read, None)
        os.close(pipe.read)

    def _disown(self) -> None:
        """In a process forked from the child: the pipes and the thread are the child's."""
        self._forked = True
        self._current, self.capturing = [], False
        self._lock = threading.RLock()  # (another thread may have held it at the fork)


def _disown(output: DescriptorOutput | None) -> None:
    if output is not None:
        output._disown()


def _unique(streams: Iterable[Any]) -> list[Any]:
    found: dict[int, Any] = {}
    for stream in streams:
        if stream is not None:
            found.setdefault(id(stream), stream)
    return list(found.values())


def _handlers() -> list[logging.Handler]:
    """The handlers of every logger made so far."""
    made = list(logging.Logger.manager.loggerDict.values())
    loggers = [logging.getLogger(), *(one for one in made if isinstance(one, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers]


def _flush(streams: Iterable[Any]) -> None:
    """Flush ``streams`` and C's own output buffers: what they hold goes where it belongs."""
    for stream in streams:
        try:
            stream.flush()
        except Exception:  # (a closed stream: nothing in it)
            continue
    fflush = _c_fflush()
    if fflush is not None:
        fflush(None)


@functools.cache
def _c_fflush() -> Callable[[Any], Any] | None:
    try:
        fflush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):  # no C library to ask
        return None
    fflush.argtypes = [ctypes.c_void_p]
    return fflush


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the log is gone: nowhere to say so
        while data:
            data = data[os.write(fd, data) :]
