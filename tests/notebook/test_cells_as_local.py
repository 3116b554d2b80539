"""A ``%%task`` cell shows and binds what the same cell would locally, through a real kernel:
a last expression whose ``__repr__`` raises."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helpers import execute, kernel_env

from nbtask import Settings


@pytest.fixture
def kc(settings: Settings, start_worker: Any, kernel: Any) -> Any:
    start_worker()
    return kernel(kernel_env(settings))[1]


def shown_text(msgs: list[dict[str, Any]]) -> str:
    """All a cell showed: its streams, errors and displays, as text."""
    parts = []
    for m in msgs:
        content = m["content"]
        if m["msg_type"] == "stream":
            parts.append(content["text"])
        elif m["msg_type"] == "error":
            parts.append("\n".join(content["traceback"]))
        elif m["msg_type"] in ("execute_result", "display_data"):
            parts.append(str(content["data"].get("text/plain", "")))
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))  # without colours


def test_a_last_expression_whose_repr_raises_shows_the_users_exception_once(kc: Any) -> None:
    """Locally the kernel shows the ``__repr__``'s own traceback once, and the cell succeeds."""
    execute(kc, "%load_ext nbtask")
    cell = "class P:\n    def __repr__(self):\n        raise ValueError('bad repr')\nP()"
    _, local, local_reply = execute(kc, cell)
    _, remote, reply = execute(kc, f"%%task --wait\n{cell}")
    assert reply["content"]["status"] == local_reply["content"]["status"]
    for msgs in (local, remote):
        text = shown_text(msgs)
        assert text.count("ValueError: bad repr") == 1, text
        assert "__repr__" in text, text
    assert "catch_format_error" not in shown_text(remote)


def test_a_value_that_cannot_come_back_shows_the_workers_repr_failure_once(kc: Any) -> None:
    """Where the value cannot come back, the worker's own failure to show it is shown."""
    execute(kc, "%load_ext nbtask")
    cell = (
        "class Q:\n    def __reduce__(self):\n        raise TypeError('not here')\n"
        "    def __repr__(self):\n        raise ValueError('bad repr')\nQ()"
    )
    _, remote, reply = execute(kc, f"%%task --wait\n{cell}")
    assert reply["content"]["status"] == "ok", reply["content"]
    text = shown_text(remote)
    assert text.count("ValueError: bad repr") == 1 and "__repr__" in text, text
    assert "did not come back from the worker" in text, text
