"""IPython magics: ``%load_ext nbtask``, ``%%task`` (and ``%task --help``), ``%nbtask``, ``%tasks``.

The magics are thin: they parse arguments and call :class:`~nbtask.notebook.session.Session`,
which holds this notebook's app, its cell runs and the hooks that deliver pending names.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.utils.process import arg_split

from nbtask._process import interrupts_held
from nbtask.client.app import App
from nbtask.errors import BrokerUnavailable, CellError, ConfigurationError, TaskNotFound
from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.follow import one_line
from nbtask.notebook.session import Session
from nbtask.notebook.widgets import TaskWidget
from nbtask.settings import Settings, read_secret_file

__all__ = ["TaskMagics", "load_ipython_extension", "session_of", "unload_ipython_extension"]

F = TypeVar("F")


def _typed(decorator: Any) -> Callable[[F], F]:
    """IPython's decorators are unannotated: keep the decorated function's type."""
    return cast("Callable[[F], F]", decorator)


def _without_comment(line: str) -> str:
    """``line`` less the ``#`` comment ending it, if any.

    A comment starts at a ``#`` outside quotes, at the start or after a space
    (``--queue "gpu #2"`` names a queue).
    """
    quote = ""
    for at, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (at == 0 or line[at - 1].isspace()):
            return line[:at]
    return line


@functools.lru_cache(maxsize=64)
def _task_options(line: str) -> argparse.Namespace:
    """The options of a ``%%task`` line (not to be changed: shared by every such line)."""
    # A comment after the options, as a cell's first line may have (``# on the big box``).
    line = _without_comment(line)
    options: argparse.Namespace = parse_argstring(TaskMagics.task, line)
    options.name_after = _name_after(line, options.name) if options.name else ""
    return _checked(options)


@functools.cache
def _option_names() -> frozenset[str]:
    """The long names of ``%%task``'s options (``wait`` of ``--wait``), read off its parser."""
    parser: argparse.ArgumentParser = cast("Any", TaskMagics.task).parser  # set by IPython
    actions = parser._actions  # argparse keeps no public list of them
    return frozenset(s[2:] for a in actions for s in a.option_strings if s.startswith("--"))


def _unquoted(value: str) -> str:
    """``value`` without the quotes IPython's argument splitting leaves around it."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _asks_for_help(magic: Any, line: str, escape: str = "%") -> bool:
    """Print ``magic``'s usage if its line asks for it (``-h``/``--help``); say whether it did.

    IPython's magic parsers have no help option (``%tasks?`` shows the same text): without
    this, ``--help`` would be an unknown argument, or a missing ``command`` of ``%nbtask``.
    """
    # The substring first: every %%task line passes here, and splitting one costs.
    if "-h" not in line or not {"-h", "--help"} & set(arg_split(line)):
        return False
    text: str = magic.parser.format_help()
    head = "::\n\n  %"  # IPython's usage line, a reST code block: as argparse prints it
    print(f"usage: {escape}{text.removeprefix(head)}" if text.startswith(head) else text, end="")
    return True


#: The options that take a value, and those of them given once per name.
_VALUED = frozenset({"-q", "--queue", "-t", "--timeout", "-r", "--retries", "-o", "--out"})
_PER_NAME = ("--keep", "--fetch", "--requires")


def _name_after(line: str, name: str) -> str:
    """The option given once per name (``--keep``) whose value the cell's ``name`` follows.

    ``--keep x y`` makes ``y`` the cell's name, not a second name to keep: "" if ``name``
    follows no such value.
    """
    words = arg_split(line)
    for i, word in enumerate(words):
        if _unquoted(word) != name or (i and words[i - 1] in {*_VALUED, *_PER_NAME}):
            continue  # another word, or an option's value
        before = words[i - 1] if i else ""
        if before.startswith("--") and "=" in before:
            flag = before.split("=", 1)[0]
        else:
            flag = words[i - 2] if i >= 2 and not before.startswith("-") else ""
        return flag if flag in _PER_NAME else ""
    return ""


def _checked(options: argparse.Namespace) -> argparse.Namespace:
    """The options with quotes removed; a value no user can mean is refused with one line.

    Checked before anything is sent: a negative timeout would send a task that expires at
    once, an empty or quoted queue one that waits forever on a queue no worker serves.
    """
    for key in ("name", "queue", "out"):
        if getattr(options, key) is not None:
            setattr(options, key, _unquoted(getattr(options, key)))
    if options.name in _option_names():  # "%%task wait": a dash forgotten, not a name meant
        raise UsageError(
            f"{options.name!r} is the name of an option: write --{options.name}; to name the "
            "cell, give it another name"
        )
    for key in ("keep", "fetch", "requires"):  # tuples: the options are shared, unchanged
        setattr(options, key, tuple(_unquoted(v) for v in getattr(options, key)))
    timeout = options.timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"argument -t/--timeout: give a number of seconds > 0, not {timeout:g}")
    if options.retries < 0:
        raise UsageError(f"argument -r/--retries: give a count >= 0, not {options.retries}")
    if options.queue is not None and (not options.queue or options.queue != options.queue.strip()):
        raise UsageError(
            f"argument -q/--queue: {options.queue!r} is not a queue name; give one a worker "
            "serves (nbtask worker -Q NAME), e.g. --queue near-data"
        )
    named = [("-o/--out", options.out)] if options.out is not None else []
    named += [
        (f"--{key}", v) for key in ("keep", "fetch", "requires") for v in getattr(options, key)
    ]
    for flag, value in named:
        if not value.isidentifier():
            raise UsageError(f"argument {flag}: {value!r} is not a Python variable name")
    both = sorted(set(options.keep) & set(options.fetch))
    if both:
        raise UsageError(
            f"--keep and --fetch both name {', '.join(map(repr, both))}: give each name one"
        )
    return options


_SESSIONS: dict[int, Session] = {}  # id(shell) -> its session (one per loaded shell)


@_typed(magics_class)
class TaskMagics(Magics):  # type: ignore[misc]
    """``%%task`` (``%task --help``), ``%nbtask`` and ``%tasks``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    @_typed(magic_arguments())
    @_typed(
        argument("name", nargs="?", help="register the cell as app.cells[NAME] (routes match NAME)")
    )
    @_typed(argument("-q", "--queue", help="send to this queue (default: the app's routes)"))
    @_typed(argument("-w", "--wait", action="store_true", help="block; output streams here"))
    @_typed(argument("-t", "--timeout", type=float, help="cancel the task after S seconds"))
    @_typed(argument("-r", "--retries", type=int, default=0, help="rerun N times on error"))
    @_typed(argument("-o", "--out", metavar="VAR", help="store the cell's handle in VAR"))
    @_typed(
        argument("--keep", action="append", default=[], metavar="NAME", help="keep NAME remote")
    )
    @_typed(
        argument("--fetch", action="append", default=[], metavar="NAME", help="bring NAME back")
    )
    @_typed(
        argument(
            "--requires",
            action="append",
            default=[],
            metavar="DATASET",
            help="run on a worker holding DATASET, available as a variable of that name",
        )
    )
    @_typed(cell_magic)
    def task(self, line: str, cell: str) -> Any:
        """Run this cell on a worker.

        The names the cell reads are shipped; the names it assigns (and shipped values
        it changes in place) come back. Without --wait the cell returns at once with a
        live view, and a later cell reading an assigned name waits for it.
        """
        if _asks_for_help(self.task, line, escape="%%"):
            return None  # the usage alone: the cell does not run
        # Parsed once per distinct line (argparse takes a good part of a millisecond).
        options = _task_options(line)
        try:
            return self.session.submit_cell(cell, options)
        except KeyboardInterrupt as exc:
            if hasattr(exc, "_render_traceback_"):  # says what it cancelled already
                raise
            # Ctrl-C while the cell was shipped or its values written: as Python says it,
            # without nbtask's frames.
            raise one_line(KeyboardInterrupt()) from None
        except BrokerUnavailable as exc:
            if hasattr(exc, "_render_traceback_"):  # the cell's own error, from the worker
                raise
            # The broker went away: one line saying which and how to start it, not
            # redis-py's frames.
            raise one_line(exc) from None

    @_typed(line_magic("task"))
    def task_usage(self, line: str) -> None:
        """``%task --help``: the usage of ``%%task``, which needs a cell body to send.

        IPython refuses a ``%%task`` line alone before calling it ("the cell body is
        empty"), pointing at this line magic of the same name: here the usage is shown.
        """
        if _asks_for_help(self.task, line, escape="%%"):
            return
        raise UsageError(
            "%task sends nothing: put %%task [options] on the first line of a cell, above "
            "the code to run on a worker (%task --help lists the options)"
        )

    @_typed(magic_arguments())
    @_typed(argument("command", choices=["connect", "status", "workers", "log"]))
    @_typed(
        argument(
            "value",
            nargs="?",
            help="broker URL (connect), process count (workers) or task id (log)",
        )
    )
    @_typed(argument("--secret-file", help="file holding the signing secret (connect)"))
    @_typed(line_magic)
    def nbtask(self, line: str) -> None:
        """Connect to a broker, show the status or a log, or resize the embedded cluster.

        ``%nbtask log ID`` shows what workers said about a task after its outcome (its
        handlers' output, retries, redeliveries); ``%nbtask log`` the embedded cluster's log.
        """
        if _asks_for_help(self.nbtask, line):
            return
        args = parse_argstring(self.nbtask, line)
        try:
            self._run_command(args)
        except (ConfigurationError, BrokerUnavailable) as exc:
            # A wrong URL or an unreachable broker is the user's to fix: one line, no frames.
            raise UsageError(f"%nbtask {args.command}: {exc}") from None

    def _run_command(self, args: argparse.Namespace) -> None:
        session = self.session
        if args.command == "status":
            print(session.status())
        elif args.command == "log":
            print(session.log(args.value))
        elif args.command == "connect":
            if not args.value:
                raise CellError("usage: %nbtask connect URL [--secret-file F]")
            secret = read_secret_file(args.secret_file) if args.secret_file else None
            if secret is None:
                _check_secret_set()
            routes = session.app.routes  # the notebook's routes stay with it
            session.reconnect(App("notebook", broker=args.value, secret=secret, routes=routes))
        else:
            if session.app.cluster is None:
                raise CellError("%nbtask workers N resizes the embedded cluster only")
            count = int(args.value) if (args.value or "").isdigit() else 0
            if count < 1:
                raise CellError("usage: %nbtask workers N (N >= 1)")
            _refuse_to_lose_kept(session, count)
            app = session.app
            session.reconnect(
                App("notebook", settings=app.settings, routes=app.routes, embedded_workers=count),
                resize=True,
            )

    @_typed(magic_arguments())
    @_typed(
        argument(
            "--attach",
            metavar="ID",
            help="re-open a task by id (or its first 8 characters or more), replaying its output",
        )
    )
    @_typed(
        argument(
            "-a",
            "--all",
            action="store_true",
            help="also this notebook's recent tasks from before a kernel restart "
            "(re-attached, their output replayed)",
        )
    )
    @_typed(argument("-n", "--limit", type=int, default=20, help="at most N recent tasks (--all)"))
    @_typed(line_magic)
    def tasks(self, line: str) -> Any:
        """A live board of this notebook's tasks; each row re-opens that task's widget.

        ``--all`` adds the notebook's recent tasks from the result store, including those
        sent before a kernel restart; ``--attach ID`` re-opens any task by id.
        """
        if _asks_for_help(self.tasks, line):
            return None
        args = parse_argstring(self.tasks, line)
        if args.attach:
            try:
                view = self.session.attach(args.attach)
            except (TaskNotFound, ConfigurationError) as exc:
                # A mistyped or expired id: one line, as %nbtask log says it.
                raise UsageError(f"%tasks --attach: {exc}") from None
            if not isinstance(view, TaskWidget):
                print(view.status_text())
                if view.text:  # type: ignore[attr-defined]
                    print(view.text.rstrip("\n"))  # type: ignore[attr-defined]
            return None
        if args.all:
            self.session.attach_recent(args.limit)
        self.session.show_board()
        return None


def _check_secret_set() -> None:
    """Refuse a connect without a secret, naming the ways a notebook gives one.

    The app would refuse it too, but naming ``secret=...`` and the worker's options.
    """
    settings = Settings.from_env()
    if not (settings.secret or settings.insecure):
        raise ConfigurationError(
            "no secret is set: give the workers' secret with %nbtask connect URL "
            "--secret-file FILE, or run %env NBTASK_SECRET=... (or NBTASK_SECRET_FILE=FILE) "
            "before connecting; %env NBTASK_INSECURE=1 connects without one (anyone who can "
            "write to the broker can then run code)"
        )


def _refuse_to_lose_kept(session: Session, count: int) -> None:
    """Refuse to resize the embedded cluster while the notebook's names hold kept values.

    A resize starts the cluster anew (its Redis too): what its workers keep goes with it.
    """
    names = [n for n in session.shell.user_ns if not is_history_name(n)]
    kept = session.pending.kept(names)
    if not kept:
        return
    listed = ", ".join(kept)
    first = kept[0]
    raise CellError(
        f"%nbtask workers {count} would lose {listed}: kept on the workers, "
        f"{'it goes' if len(kept) == 1 else 'they go'} with the embedded cluster, which a "
        f"resize starts anew. Fetch {'it' if len(kept) == 1 else 'each'} into the notebook "
        f"first ({first} = {first}.fetch()), or del what is not needed, then resize. "
        "Nothing was changed"
    )


def load_ipython_extension(shell: Any, app: App | None = None) -> None:
    """``%load_ext nbtask``: connect (or start the embedded cluster) and add the magics."""
    if id(shell) in _SESSIONS:
        return
    session = Session(shell, app)
    try:
        session.start()
        shell.register_magics(TaskMagics(shell, session))
    except BaseException as exc:
        # Stopped (a notebook's Stop) or failed while starting: what it started so far
        # (the embedded cluster, the hooks) is stopped, and %load_ext can run again.
        with interrupts_held():
            session.stop()
        if isinstance(exc, KeyboardInterrupt):  # as Python says it, without nbtask's frames
            raise one_line(KeyboardInterrupt()) from None
        raise
    _SESSIONS[id(shell)] = session


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext nbtask``: remove the hooks, stop the listener and embedded cluster."""
    session = _SESSIONS.pop(id(shell), None)
    if session is not None:
        running = session.pending.running()
        if running:  # the session cancels them, and nothing here will hear of them: say so
            cells = ", ".join(f"{run.label!r} [{run.handle.id[:8]}]" for run in running)
            # An embedded cluster ends with the session, and what it kept with it.
            embedded = session.owns_app and session.app.cluster is not None
            after = "" if embedded else "; after %load_ext nbtask, %tasks --all shows their output"
            print(
                f"nbtask: cancelling {len(running)} cell(s) still running on the workers "
                f"({cells}): what they assign will not reach this notebook{after}",
                file=sys.stderr,
            )
        session.stop()
        # IPython keeps registered magics after unloading; drop ours so none is left
        # pointing at a closed session.
        for kind, names in (("cell", ["task"]), ("line", ["task", "nbtask", "tasks"])):
            for name in names:
                shell.magics_manager.magics[kind].pop(name, None)


def session_of(shell: Any) -> Session | None:
    """The session loaded into ``shell``, if any."""
    return _SESSIONS.get(id(shell))
