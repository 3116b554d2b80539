"""Revoking and purging tasks, and the ids :class:`~nbtask.client.app.App` calls take.

Kept apart from the rest of the app: what stops tasks, and how a text names one.
"""

from __future__ import annotations

from collections.abc import Sequence

from nbtask.client.connection import AppConnection
from nbtask.client.reattach import resolve_task_id
from nbtask.core.options import check_task_id, queue_name, terminate_signal
from nbtask.errors import ConfigurationError
from nbtask.settings import MAX_SECONDS
from nbtask.wire.events import FINAL_SEQ, Event, EventType, State
from nbtask.wire.records import TaskRecord

__all__ = ["Revoking"]


class Revoking(AppConnection):
    """What revokes and purges tasks, for :class:`~nbtask.client.app.App`."""

    def _task_id(self, text: str, *, unsent: bool = False) -> str:
        """The id of the task ``text`` names: one this app follows, else its id or prefix.

        See :func:`~nbtask.client.reattach.resolve_task_id` (``unsent`` too).
        """
        check_task_id(text)
        if self._listen().get(text) is not None:
            return text
        return resolve_task_id(self.store, text, self.settings.result_ttl, unsent=unsent)

    def revoke(
        self,
        task_id: str,
        *,
        terminate: bool = False,
        grace: float = 5.0,
        signal: str | int = "SIGTERM",
    ) -> bool:
        """Revoke a task: a queued one never starts; with ``terminate``, a running one stops.

        Parameters
        ----------
        task_id
            The task to revoke: its id, or a unique prefix of it of 8 characters or more
            (as :meth:`handle` takes). An id that names no kept task and begins none (a
            chain's later step not sent yet, a task to be sent with this id) is revoked
            ahead, as Celery does: it never starts.
        terminate
            Also stop it if it is running: its worker process gets SIGINT (a
            ``KeyboardInterrupt`` in the task) and is killed ``grace`` seconds later if
            the task has not ended by then. Its state becomes ``REVOKED``.
        grace
            Seconds between the interrupt and the kill (a finite number, 0 or more).
        signal
            Celery's: the signal that terminates it, a name (``"SIGKILL"``, ``"KILL"``)
            or a number. ``SIGTERM`` (the default) or ``SIGINT`` is the interrupt above;
            ``SIGKILL`` kills its worker process at once (``REVOKED``); any other is sent
            to that process as is (a signal the task does not handle ends it: ``REVOKED``),
            which is killed ``grace`` seconds later if the task has not ended by then;
            but ``SIGALRM`` and ``SIGUSR1``, which worker processes use, are refused.

        Returns
        -------
        bool
            True if the task was revoked before it started, or a terminate request was
            sent to the workers; False if it had already finished, or (without
            ``terminate``) its record says it has started. Either way a task that has not
            finished does not start after this call, nor does a redelivery of one that
            runs.

        Raises
        ------
        TaskNotFound
            ``task_id`` begins the ids of several kept tasks.
        """
        check_task_id(task_id)
        if not (isinstance(grace, (int, float)) and 0 <= grace <= MAX_SECONDS):
            # NaN or infinity would never kill a task that ignores the interrupt.
            raise ConfigurationError(f"grace must be a number of seconds >= 0, got {grace!r}")
        signame = terminate_signal(signal)
        task_id = self._task_id(task_id, unsent=True)
        record = self.store.get_record(task_id)
        if self._revoke_pending(task_id, record, "revoked"):
            return True
        if not terminate or record is None or record.state is not State.STARTED:
            return False
        command = {"kind": "control", "cmd": "terminate", "id": task_id, "grace": float(grace)}
        self.store.send_control(self.signer.seal({**command, "signal": signame}))
        return True

    def _revoke_pending(self, task_id: str, record: TaskRecord | None, reason: str) -> bool:
        """Mark a task that has not started REVOKED and tell its client; False if it had."""
        known = record is not None and self.store.is_channel(record.client)
        channel = record.client if known and record is not None else self.channel
        handle = self._listen().get(task_id)
        # Its client checks ``sent`` (the record's copy of it: events name their send; a
        # chain's step not sent yet has no record, and its handle knows the send).
        sent = record.sent if record is not None else handle.sent if handle is not None else None
        run = (self.settings.key_prefix, sent)
        event = Event(EventType.REVOKED, task_id, FINAL_SEQ, {"reason": reason}, run=run)
        raw = self.signer.seal(event.to_header())
        kept = self.store.revoke_pending(task_id, raw, channel)
        if not kept:
            return False
        # The store keeps it; a live client hears it.
        self.transport.notify(channel, [raw], entries=[kept])
        if handle is not None:
            handle.apply(event)  # at once; the same event arriving later is ignored
        return True

    def purge(self, queues: Sequence[str] | None = None) -> list[str]:
        """Delete every message waiting on ``queues``; each of those tasks becomes REVOKED.

        Messages waiting for their ETA or countdown go too. Tasks already running are left
        alone (``revoke(id, terminate=True)`` stops one). Each purged task's state becomes
        ``REVOKED`` with reason ``"purged"`` and its client is told, so no handle waits
        for a task that will never run.

        Parameters
        ----------
        queues
            Queue names; default: the default queue.

        Returns
        -------
        list of str
            The ids of the tasks purged.
        """
        if isinstance(queues, str):
            raise ConfigurationError(
                f"purge(queues=...) takes a list of queue names, got str {queues!r}; "
                f"give [{queues!r}]"
            )
        names = list(queues) if queues else [self.settings.default_queue]
        for name in names:
            queue_name(name, "purge")
        purged = []
        for task_id in dict.fromkeys(self.transport.purge(names)):
            record = self.store.get_record(task_id)
            if record is not None and self._revoke_pending(task_id, record, "purged"):
                purged.append(task_id)
        return purged
