"""The layers of docs/architecture.md hold: imports point down, no cycles, no squeezing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "nbtask"


def test_import_contracts_are_kept() -> None:
    """import-linter: layers (type-only imports included), client/worker apart, no cycles."""
    command = shutil.which("lint-imports")
    assert command is not None, "import-linter is missing: pip install -e '.[test]'"
    result = subprocess.run(
        [command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_no_line_is_squeezed_past_the_formatter() -> None:
    squeezed = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "fmt: skip" in line or "fmt: off" in line
    ]
    assert squeezed == []


def test_every_package_says_what_it_owns() -> None:
    packages = [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    layers = {"cli", "notebook", "client", "worker", "core", "brokers", "wire", "settings"}
    assert {p.name for p in packages} == layers
    for package in packages:
        source = (package / "__init__.py").read_text()
        assert source.lstrip().startswith('"""'), f"{package.name}/__init__.py has no docstring"


def _module_lengths() -> dict[Path, int]:
    return {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}


def test_modules_stay_readable() -> None:
    """Modules under ~500 lines (DESIGN §10): split by concept beyond that."""
    long = {str(p.relative_to(ROOT)): n for p, n in _module_lengths().items() if n > 550}
    assert long == {}
