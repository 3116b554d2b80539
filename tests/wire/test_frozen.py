"""Frozen dataclasses made at once (FrozenMaker) are the ones their __init__ makes."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import task_message

from nbtask.core.context import Request
from nbtask.errors import DecodeError
from nbtask.wire.frozen import FrozenMaker
from nbtask.wire.message import TaskMessage

MESSAGE = task_message(name="nbtask.cell")


def test_an_instance_made_at_once_is_the_one_init_makes() -> None:
    make = FrozenMaker(Request)
    given = {"id": "t1", "name": "add", "args": (1,), "kwargs": {}, "queue": "q", "hostname": "h"}
    made, init = make(**given, retries=2), Request(**given, retries=2)
    assert made == init and list(vars(made)) == list(vars(init))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.id = "t2"  # type: ignore[misc]
    # A default_factory is called for each instance.
    assert made.delivery_info == {} and made.delivery_info is not make(**given).delivery_info


def test_a_missing_or_unknown_field_is_refused_as_init_refuses_it() -> None:
    make = FrozenMaker(Request)
    with pytest.raises(TypeError, match="'hostname'"):
        make(id="t1", name="add", args=(), kwargs={}, queue="q")
    with pytest.raises(TypeError, match="'nope'"):
        make(id="t1", name="add", args=(), kwargs={}, queue="q", hostname="h", nope=1)


def test_a_header_reads_back_as_the_message_and_names_what_is_wrong() -> None:
    header = MESSAGE.to_header()
    read = TaskMessage.from_header(header)
    assert read == MESSAGE and list(vars(read)) == list(vars(MESSAGE))
    assert TaskMessage.from_header({**header, "from_a_later_nbtask": 1}) == MESSAGE
    del header["queue"]
    with pytest.raises(DecodeError, match="'queue' is missing"):
        TaskMessage.from_header(header)
    with pytest.raises(DecodeError, match="'retries' has a wrong type"):
        TaskMessage.from_header({**MESSAGE.to_header(), "retries": True})
