"""A task's label, from the signed message to its record, and records without one."""

from __future__ import annotations

import dataclasses

from helpers import task_message

from nbtask.core.outgoing import to_publish
from nbtask.wire.events import State
from nbtask.wire.message import TaskMessage
from nbtask.wire.records import TaskRecord

MESSAGE = task_message(name="nbtask.cell")


def test_a_label_goes_in_the_header_and_the_pending_record() -> None:
    labelled = dataclasses.replace(MESSAGE, label="df = load()")
    assert TaskMessage.from_header(labelled.to_header()) == labelled
    record = TaskRecord.parse(to_publish(labelled, b"raw").record)
    assert record is not None and record.label == "df = load()"


def test_messages_and_records_without_a_label_read_as_before() -> None:
    # Sent by an earlier nbtask (or without label=): the header has no such field.
    header = MESSAGE.to_header()
    assert "label" not in header
    assert TaskMessage.from_header(header).label is None
    assert "label" not in to_publish(MESSAGE, b"raw").record
    # A record an earlier nbtask wrote, without the field.
    old = {b"state": b"SUCCESS", b"name": b"nbtask.cell", b"started_at": b"12.5"}
    record = TaskRecord.parse(old)
    assert record is not None and record.label == ""
    assert (record.state, record.started_at) == (State.SUCCESS, 12.5)
