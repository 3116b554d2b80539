"""What a worker process announces it holds: parsed defensively, shown printable."""

from __future__ import annotations

import pytest

from nbtask.wire.holdings import Held, Holdings, holdings_lines
from nbtask.wire.records import WorkerInfo

INFO = WorkerInfo("host", 10, ("default",), 1, ("host-10-abc-0",), pids=(11,))


def test_an_announcement_round_trips_and_is_shown_with_sizes() -> None:
    holdings = Holdings((Held("x", 2_400_000, "Cell In[3]"),), (Held("iris", 6_000),))
    parsed = Holdings.parse(holdings.to_json())
    assert parsed == holdings
    assert holdings_lines(INFO, {"host-10-abc-0": holdings}) == [
        "  process 0 (pid 11) holds 2.4 MB:",
        "    x  2.4 MB from Cell In[3]",
        "    dataset iris  0.0 MB",
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"values": [{"name": "x", "size": -1}], "datasets": []}',
        b'{"values": [{"name": "x", "size": true}], "datasets": []}',
        b'{"values": [{"name": 3, "size": 1}], "datasets": []}',
        b'{"values": "x", "datasets": []}',
        b"\xff\xfe",
        b"[" * 100_000,
        "x" * 300_000,
    ],
)
def test_anything_else_in_the_store_reads_as_nothing(raw: object) -> None:
    assert Holdings.parse(raw) is None


def test_control_codes_in_a_forged_announcement_are_not_printed() -> None:
    forged = Holdings((Held("x\x1b[2J", 1, "Cell\x07"),))
    text = "\n".join(holdings_lines(INFO, {"host-10-abc-0": forged}))
    assert "\x1b" not in text and "\x07" not in text
