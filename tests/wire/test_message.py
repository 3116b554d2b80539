"""A task message's header: times a worker cannot keep are refused, naming the field."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from helpers import SECRET, task_message

from nbtask.errors import DecodeError
from nbtask.wire.envelope import Signer
from nbtask.wire.message import LATEST_TIME, TaskMessage

NOW = 1_765_000_000.123456


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("created", math.nan),
        ("created", 10**400),  # JSON integers have no bound: no float holds this one
        ("eta", math.inf),
        ("eta", 1e300),
        ("expires", -math.inf),
        ("sent", math.nan),
        ("time_limit", math.nan),
        ("soft_time_limit", -1.0),
        ("soft_time_limit", 1e12),  # a worker could not set it: OverflowError in the task
        ("time_limit", 1e300),
    ],
)
def test_a_signed_header_with_a_time_no_worker_can_keep_is_refused_naming_it(
    field: str, value: Any
) -> None:
    """Signed with the real secret, it verifies; reading it as a task message refuses it.

    Before, each passed the type check: a NaN ``created`` never aged past ``max_age``, and
    a huge integer raised ``OverflowError`` in the worker.
    """
    signer = Signer(SECRET)
    header = {**task_message(created=NOW).to_header(), field: value}
    envelope = signer.open(signer.seal(header))
    with pytest.raises(DecodeError, match=f"field '{field}' is not a time nbtask can keep"):
        TaskMessage.from_header(envelope.header)


def test_times_in_their_bounds_are_kept_as_sent() -> None:
    """The far future up to the end of year 9999 (``datetime.max``: never), an eta in the
    past (which means now), a limit of about 31 years."""
    never = dt.datetime.max.replace(tzinfo=dt.timezone.utc).timestamp()
    assert never == LATEST_TIME
    message = task_message(created=NOW, eta=never, expires=-1.0, time_limit=1e9)
    signer = Signer(SECRET)
    envelope = signer.open(signer.seal(message.to_header()))
    assert TaskMessage.from_header(envelope.header) == message
