"""The Lua scripts define the functions they call, and only those.

Every ``local function`` of a script is made anew each time Redis runs it, so a script
carrying shared functions it never calls pays for them on every task (the start check,
the publish and the last write run once per task each). Each must still define every
function it calls, before its first call.
"""

from __future__ import annotations

import re

import pytest

from nbtask.brokers.eta_scripts import ETA_SCRIPTS
from nbtask.brokers.follow_up_scripts import FOLLOW_UP_SCRIPTS
from nbtask.brokers.lost_scripts import LOST_SCRIPTS
from nbtask.brokers.rate_scripts import RATE_SCRIPTS
from nbtask.brokers.scripts import STORE_SCRIPTS
from nbtask.brokers.streams_scripts import STREAMS_SCRIPTS

STORE = {**STORE_SCRIPTS, **ETA_SCRIPTS, **FOLLOW_UP_SCRIPTS, **LOST_SCRIPTS, **RATE_SCRIPTS}
SCRIPTS = {f"store {k}": v for k, v in STORE.items()}
SCRIPTS.update({f"streams {k}": v for k, v in STREAMS_SCRIPTS.items()})


def _calls(body: str, name: str) -> list[int]:
    """Where ``name`` is called in ``body`` (not where it is defined)."""
    return [m.start() for m in re.finditer(rf"(?<!function )\b{name}\(", body)]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_defines_each_function_it_calls_once_and_no_other(name: str) -> None:
    body = SCRIPTS[name]
    defined = re.findall(r"local function (\w+)\(", body)
    assert len(defined) == len(set(defined)), f"{name} defines a function twice"
    for function in defined:
        calls = _calls(body, function)
        assert calls, f"{name} defines {function}() and never calls it"
        assert min(calls) > body.index(f"local function {function}("), (
            f"{name} calls {function}() before defining it"
        )


def test_the_per_task_scripts_carry_no_housekeeping_functions() -> None:
    # (The housekeeping ones set keys of another type aside: not a per-task step.)
    for name in ("started", "publish", "finish"):
        assert "set_aside" not in STREAMS_SCRIPTS[name]
        assert "record_state" not in STREAMS_SCRIPTS[name]
