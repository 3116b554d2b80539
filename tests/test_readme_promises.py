"""Every test the README names (its delivery, reliability, security and fidelity tables)
exists: a promise whose test was renamed or removed is a promise nobody checks.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED = re.compile(r"`(test_[A-Za-z0-9_]+(?:\.py)?)`")


def test_every_test_the_readme_names_exists() -> None:
    named = set(NAMED.findall((ROOT / "README.md").read_text()))
    sources = list((ROOT / "tests").rglob("*.py"))
    defined = set()
    for source in sources:
        defined |= set(re.findall(r"def (test_[A-Za-z0-9_]+)\(", source.read_text()))
    files = {source.name for source in sources}
    missing = sorted(name for name in named if name not in defined and name not in files)
    assert len(named) > 100  # the tables are read at all
    assert missing == [], f"the README names tests that do not exist: {missing}"
