"""What Python and package versions a process runs, to compare a kernel with its workers.

A pickle made with one version of a package can fail, or mean something else, under
another: a cell that uses a package whose version differs on the workers is worth a
warning before it is sent.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

__all__ = ["PYTHON", "installed_versions", "version_of"]

#: The key of the Python version among a process's versions.
PYTHON = "python"


def installed_versions() -> dict[str, str]:
    """``{top-level module: version}`` of every installed distribution, and Python's.

    Reads the installed distributions' metadata: a fraction of a second, done once per
    worker.
    """
    versions = {PYTHON: platform.python_version()}
    for module, distributions in importlib.metadata.packages_distributions().items():
        if module.startswith("_"):
            continue
        for name in distributions:
            try:
                versions[module] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            break
    return versions


def version_of(module: str) -> str | None:
    """The version of ``module`` here, if it says (cheap: no scan of all distributions).

    Its ``__version__`` when imported, else the distribution of the same name's.
    """
    if module == PYTHON:
        return platform.python_version()
    loaded = sys.modules.get(module)
    declared = getattr(loaded, "__version__", None)
    if isinstance(declared, str):
        return declared
    try:
        return importlib.metadata.version(module)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
