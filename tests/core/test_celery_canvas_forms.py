"""Celery's canvas call forms (its docs' spellings): groups and chains sent with extra
arguments and options, as Celery sends them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_housekeeping

from nbtask import App, chain, group
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


def test_a_group_takes_celerys_call_forms_partial_arguments_and_options(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    start_worker("-Q", f"{app.settings.default_queue},elsewhere")
    add, _, _, _ = steps
    # Signatures as separate arguments, or one iterable of them.
    assert group(add.s(2, 2), add.s(4, 4)).delay().get(timeout=15) == [4, 8]
    assert group(add.s(i, i) for i in range(3)).delay().get(timeout=15) == [0, 2, 4]
    # Extra arguments go to every member, before its own; an immutable one ignores them.
    assert group([add.s(2), add.s(4)])(10).get(timeout=15) == [12, 14]
    assert group([add.s(2), add.si(1, 1)]).delay(10).get(timeout=15) == [12, 2]
    assert group([add.s(y=2)]).apply_async((1,)).get(timeout=15) == [3]
    # Options go to every member: this worker reads only the queue named here.
    sent = group([add.s(1, 1), add.s(2, 2)]).apply_async(countdown=0.5, queue="elsewhere")
    assert sent.get(timeout=15) == [2, 4]
    named = group([add.s(1, 1)]).apply_async(task_id="a-group-of-mine")
    assert named.id == "a-group-of-mine" and named.get(timeout=15) == [2]
    with pytest.raises(TypeError, match="Cannot add link to group"):
        group([add.s(1, 1)]).apply_async(link=add.s(1))
    with pytest.raises(TypeError, match="Cannot add link_error to group"):
        group([add.s(1, 1)]).apply_async(link_error=add.s(1))


def test_a_chain_takes_celerys_options_first_step_links_last_errbacks_every_step(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker("-Q", f"{app.settings.default_queue},elsewhere")
    add, _, fail, note = steps
    # countdown, queue... are the first step's options.
    last = chain(add.s(1, 1), add.s(10)).apply_async(countdown=0.5, queue="elsewhere")
    assert last.get(timeout=15) == 12
    # task_id names the last step, the handle returned.
    named = chain(add.s(1, 1), add.s(10)).apply_async(task_id="the-chains-last")
    assert named.id == "the-chains-last" and named.get(timeout=15) == 12
    # link follows the last step.
    link_id, errback_id = "a-chains-link", "a-chains-errback"
    follow = app.expect(link_id, note.name)
    done = chain(add.s(1, 1), add.s(10)).apply_async(
        link=note.s(str(tmp_path / "linked")).set(task_id=link_id)
    )
    assert done.get(timeout=15) == 12
    assert follow.get(timeout=15) == 12
    # link_error is every step's errback: the step that fails calls it, once.
    errors = tmp_path / "errors"
    errback = app.expect(errback_id, note.name)
    failed = chain(add.s(1, 1), fail.s(), add.s(1)).apply_async(
        link_error=note.s(str(errors)).set(task_id=errback_id)
    )
    with pytest.raises(ValueError, match="step failed"):
        failed.get(timeout=15)
    failing_step = failed.parent
    assert failing_step is not None
    assert errback.get(timeout=15) == failing_step.id
    wait_for_housekeeping(app)
    assert [rec["value"] for rec in read_records(errors)] == [failing_step.id]
