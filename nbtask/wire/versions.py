"""What Python and package versions a process runs, to compare a kernel with its workers.

A pickle made with one version of a package can fail, or mean something else, under
another: a cell that uses a package whose version differs on the workers is worth a
warning before it is sent.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys

__all__ = [
    "MAX_VERSION_BYTES",
    "PYTHON",
    "installed_versions",
    "probe_result",
    "start_probe",
    "version_of",
]

#: The key of the Python version among a process's versions.
PYTHON = "python"
#: The longest version a worker announces (a release with a long local label is far
#: shorter): a longer one announced was not written by nbtask, and is not read.
MAX_VERSION_BYTES = 256


def installed_versions() -> dict[str, str]:
    """``{top-level module: version}`` of every installed distribution, and Python's.

    Reads the installed distributions' metadata: a fraction of a second of CPU and a few
    MiB that stay allocated, so long-lived processes ask a child (:func:`start_probe`).
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


def start_probe() -> subprocess.Popen[bytes]:
    """Start finding this Python's :func:`installed_versions` in a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "nbtask.wire.versions"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def probe_result(probe: subprocess.Popen[bytes]) -> dict[str, str] | None:
    """What a probe found once it is done (``{}`` if it failed); ``None`` while it runs."""
    if probe.poll() is None:
        return None
    assert probe.stdout is not None
    with probe.stdout:
        out = probe.stdout.read()
    try:
        found = json.loads(out)
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


if __name__ == "__main__":
    print(json.dumps(installed_versions()))
