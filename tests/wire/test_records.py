"""A task's label, from the signed message to its record, and records without one."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING

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


def test_a_header_leaves_out_fields_at_their_defaults_and_reads_back_the_same() -> None:
    header = MESSAGE.to_header()
    required = {f.name for f in dataclasses.fields(TaskMessage) if f.default is MISSING}
    assert set(header) == {"kind"} | required
    assert TaskMessage.from_header(header) == MESSAGE
    # Set away from their defaults (0 and False included), fields travel and read back.
    changed = dataclasses.replace(
        MESSAGE,
        retries=2,
        callbacks_len=5,
        time_limit=0.0,
        reject_on_worker_lost=False,
        store_result=False,
        serializer="json",
        parent_id="p1",
        root_id="r1",
        rejects=3,
    )
    assert TaskMessage.from_header(changed.to_header()) == changed
    # A header with every field, as an earlier nbtask wrote it, reads the same.
    full = {"kind": "task", **dataclasses.asdict(MESSAGE)}
    assert TaskMessage.from_header(full) == MESSAGE
