"""What is parked for a gone process's own queue until its due time (a countdown, a
retry's countdown) is parked again for the queue it falls back to, due as it was, its
record naming that queue (``LostTasks.rehome``): only the supervisor serving a process's
own queue moves what is due there, so it stayed parked for good once that process was
gone. A look parks a bounded number; a message that supervisor moved meanwhile is left
where it went. Run here directly on each broker's transport; through workers in
``test_moved_queue`` and ``test_holder_lost``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import RECORD_ID
from raw_broker import RawBroker

from nbtask import App, State
from nbtask.brokers import Transport, open_broker
from nbtask.core.holding import holder_queue
from nbtask.worker.lost import MOVED_PER_LOOK, LostTasks

pytestmark = pytest.mark.brokers()

OWN = holder_queue("ghost-0")


@pytest.fixture
def transport(app: App) -> Iterator[Transport]:
    """The test's broker, as a worker cleaning up after a dead one has it."""
    opened = open_broker(app.settings, app.settings.broker_url or "")
    yield opened
    opened.close()


def _park_on_own(app: App, access: RawBroker) -> tuple[str, bytes, float]:
    """A task sent to ghost-0's own queue with a countdown: its id, ETA member and due time."""
    h = app.send_task(RECORD_ID, ("unused",), queue=OWN, countdown=600)
    app.flush()
    [(member, due)] = access.store.zrange(access.keys.eta_key(OWN), 0, -1, withscores=True)
    return h.id, member, due


def test_what_is_parked_for_a_gone_process_queue_is_parked_for_its_fallback_due_as_it_was(
    app: App, access: RawBroker, transport: Transport
) -> None:
    """Behind 150 forgeries due first (one without a task id), a genuine task parked for
    ghost-0's queue: the first look parks 100 elsewhere at most and leaves the queue; the
    next dead-letters the rest of the forgeries and parks the task for 'default', due as
    it was, sealed for 'default', its record naming it; the queue is gone. Before, nothing
    parked was looked at: all 151 stayed, and the queue counted as gone at once."""
    task_id, member, due = _park_on_own(app, access)
    own = access.keys.eta_key(OWN)
    forged = {f"forged{i}:not a message".encode(): float(i) for i in range(149)}
    access.store.zadd(own, {**forged, b"no task id": 149.0})
    lost = LostTasks(transport, app.signer, app.settings)

    assert lost.rehome(OWN, "ghost-0") == (0, False)
    assert access.store.zcard(own) == 151 - MOVED_PER_LOOK
    assert lost.rehome(OWN, "ghost-0") == (1, True)
    assert not access.store.exists(own)

    [(moved, moved_due)] = access.store.zrange(
        access.keys.eta_key("default"), 0, -1, withscores=True
    )
    assert moved_due == due
    moved_id, _, raw = moved.partition(b":")
    assert moved_id.decode() == task_id
    assert app.signer.open(raw).header["queue"] == "default"
    assert app.signer.open(member.partition(b":")[2]).header["queue"] == OWN
    record = app.store.get_record(task_id)
    assert record is not None and record.state is State.PENDING
    assert record.queue == "default"
    dead = [fields for fields in access.dead_letters() if fields[b"q"] == OWN.encode()]
    assert sorted(fields[b"e"] for fields in dead) == sorted(
        [b"not a message"] * 149 + [b"no task id"]
    )


def test_a_parked_message_its_supervisor_moved_meanwhile_is_left_where_it_went(
    app: App, access: RawBroker, transport: Transport
) -> None:
    """Read to be parked elsewhere, then made due and moved to ghost-0's queue by the
    transport (as ghost-0's supervisor, paused and woken, would): parking it again, or
    dead-lettering it, does nothing, and its record does not name 'default'."""
    task_id, member, _ = _park_on_own(app, access)
    [parked] = transport.parked(OWN)
    access.store.zadd(access.keys.eta_key(OWN), {member: 1.0})  # due
    transport.move_due([OWN])
    assert not access.store.exists(access.keys.eta_key(OWN))

    assert not transport.repark(parked, "default", parked.raw, task_id)
    assert not transport.dead_letter_parked(parked)
    assert access.store.zcard(access.keys.eta_key("default")) == 0
    assert access.dead_letters() == []
    record = app.store.get_record(task_id)
    assert record is not None and record.queue != "default"
    assert access.waiting(OWN)


def test_a_planted_key_of_another_type_where_a_queue_parks_is_set_aside(
    app: App, access: RawBroker, transport: Transport
) -> None:
    """nbtask parks in sorted sets only: a string planted there holds nothing to move, and
    is deleted (a later look at that queue would fail on it otherwise)."""
    access.store.set(access.keys.eta_key(OWN), b"planted")
    assert transport.parked(OWN) == []
    assert not access.store.exists(access.keys.eta_key(OWN))


def test_what_waits_on_a_gone_process_queue_is_moved_a_bounded_number_per_look(
    app: App, access: RawBroker, transport: Transport
) -> None:
    """150 forgeries waiting on ghost-0's queue (anyone with broker access can put them
    there): the first look dead-letters 100 at most and leaves the queue, the next the
    rest, and the queue is gone. Before, one look took them all: a queue of millions held
    up the heartbeat of the worker cleaning up."""
    for i in range(150):
        access.inject(f"forged {i}".encode(), queue=OWN)
    lost = LostTasks(transport, app.signer, app.settings)

    assert lost.rehome(OWN, "ghost-0") == (0, False)
    assert len(_dead_lettered_from(access, OWN)) == MOVED_PER_LOOK
    assert lost.rehome(OWN, "ghost-0") == (0, True)
    assert len(_dead_lettered_from(access, OWN)) == 150
    assert not access.queue_exists(OWN)


def _dead_lettered_from(access: RawBroker, queue: str) -> list[dict[bytes, bytes]]:
    return [fields for fields in access.dead_letters() if fields[b"q"] == queue.encode()]
