"""Celery's names on signatures and group results: ``clone``, ``freeze``, ``link``,
``on_error``, ``name``, ``signature(name)``; a group's ``id``, ``results``, ``join``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_housekeeping

import nbtask
from nbtask import App, group
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


def test_a_group_handle_answers_to_celerys_group_result_names(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, _, fail, _ = steps
    gh = group(add.s(1, 1), add.s(2, 2)).delay()
    assert isinstance(gh.id, str) and gh.id
    assert [h.id for h in gh.results] == [h.id for h in gh.handles] == [h.id for h in gh.children]
    assert gh.join(timeout=15) == [2, 4]
    assert gh.join_native(timeout=15, interval=0.1) == [2, 4]
    assert gh.waiting() is False
    mixed = group([add.s(1, 1), fail.s(0)]).delay()
    two, error = mixed.join(timeout=15, propagate=False)
    assert two == 2 and isinstance(error, ValueError)


def test_a_signature_answers_to_celerys_signature_names(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, _, fail, note = steps
    sig = add.s(2)
    assert sig.name == add.name
    copy = sig.clone((8,), countdown=0.1)
    assert (copy.args, copy.options, sig.args, sig.options) == (
        (8, 2),
        {"countdown": 0.1},
        (2,),
        {},
    )
    assert copy.delay().get(timeout=15) == 10

    # freeze(): the id is given now, and the handle frozen is the one its send returns.
    frozen = add.s(3, 4)
    later = frozen.freeze()
    assert frozen.options["task_id"] == later.id
    assert frozen.delay() is later
    assert later.get(timeout=15) == 7

    # Celery's errback gist: task.s(x).on_error(err.s()).delay()
    errors = tmp_path / "errors"
    errback = note.s(str(errors))
    errback_handle = errback.freeze()
    failed = fail.s(1, "failed on purpose").on_error(errback).delay()
    with pytest.raises(ValueError, match="failed on purpose"):
        failed.get(timeout=15)
    assert errback_handle.get(timeout=15) == failed.id

    # link() adds in place and returns the callback, as Celery's.
    linked = tmp_path / "linked"
    first = add.s(1, 1)
    callback = note.s(str(linked))
    follow = callback.freeze()
    assert first.link(callback) is callback
    assert first.delay().get(timeout=15) == 2
    assert follow.get(timeout=15) == 2
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(errors)] == [failed.id]

    # signature() by name, from the app or nbtask (the default app, or app=).
    by_name = app.signature(add.name, args=(5,), kwargs={"y": 5}, countdown=0.1)
    assert (by_name.task, by_name.options) == (add, {"countdown": 0.1})
    assert by_name.delay().get(timeout=15) == 10
    assert nbtask.signature(add.name, (1, 2), app=app).delay().get(timeout=15) == 3
    assert nbtask.signature(add, (2, 2)).delay().get(timeout=15) == 4
    assert nbtask.signature(add.s(1), (6,)).delay().get(timeout=15) == 7
    # A task only the workers define, by name.
    assert app.signature("tests.sample_tasks.add", (2, 3)).delay().get(timeout=15) == 5


def test_set_changes_the_signature_itself_and_immutable_makes_it_so(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    # As Celery's set(): the signature itself changes and is returned (before, a copy was
    # returned and the signature left as it was), and set(immutable=True) makes it an si()
    # one (before, a chain still gave it the previous result, and delay() raised
    # TypeError: apply_async() got an unexpected keyword argument 'immutable').
    start_worker()
    add, *_ = steps
    sig = add.s(1, 2)
    assert sig.set(countdown=0.1) is sig
    assert sig.options == {"countdown": 0.1}
    assert sig.delay().get(timeout=15) == 3
    fixed = add.s(5, 5)
    fixed.set(immutable=True)
    assert fixed.immutable and fixed.options == {}
    assert (add.s(1, 1) | fixed).delay().get(timeout=15) == 10
    assert add.s(5, 5).set(immutable=True).delay().get(timeout=15) == 10
    # Sending a chain, with its options, leaves its steps' signatures as they were.
    first, second = add.s(1, 1), add.s(2)
    workflow = first | second
    assert workflow.apply_async(countdown=0.1, task_id="the-chains-last").get(timeout=15) == 4
    assert (first.options, second.options) == ({}, {})
    assert workflow.delay().get(timeout=15) == 4
