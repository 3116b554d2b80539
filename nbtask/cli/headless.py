"""``nbtask run NOTEBOOK``: its options checked here, before a kernel starts.

The run itself is :mod:`nbtask.notebook.headless`, imported only by this command so
that the other commands never load nbclient or a kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbtask.cli.options import settings_for
from nbtask.errors import ConfigurationError, NotebookFailed, NotebookInterrupted

__all__ = ["run_headless"]


def run_headless(args: argparse.Namespace) -> int:
    """``nbtask run NOTEBOOK``: execute a notebook headless, streaming its output."""
    # nbclient and the kernel machinery load only for this command.
    from nbtask.notebook.headless import run_notebook  # noqa: PLC0415 - heavy

    # A bad broker URL or a missing secret, said before any kernel starts.
    settings = settings_for(args)
    if args.output is not None:
        _check_output(args.output)
    # The kernel reads its settings from the environment, as a notebook's does.
    env = {"NBTASK_SECRET": settings.secret} if args.secret_file and settings.secret else {}
    try:
        run_notebook(args.notebook, args.output, broker=args.broker, timeout=args.timeout, env=env)
    except NotebookInterrupted as exc:  # Ctrl-C, or SIGTERM: exits as a shell reports it
        print(f"nbtask run: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    except NotebookFailed as exc:
        print(f"nbtask run: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_output(text: str) -> None:
    """Refuse an ``-o`` the executed notebook could not be written to, before it runs."""
    path = Path(text)
    if not text.strip() or path.is_dir():
        raise ConfigurationError(f"-o {text!r} is not a file name: give one, e.g. -o out.ipynb")
    if not path.parent.is_dir():
        raise ConfigurationError(f"-o {text}: there is no folder {path.parent}")
