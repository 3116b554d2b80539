"""An App's connection to its broker: made on first use, flushed and closed once.

The part of :class:`~nbtask.client.app.App` that connects (starting the embedded cluster
when no broker is configured) and holds what connecting brings: the transport and its
store, the message builder and its signer, the listener thread on the client's event
channel, the live workers as last read. Kept apart from the App's registry and its
sending and following of tasks; the App inherits it, so sending reads these attributes
with no call in between.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence

from nbtask.brokers import Store, Transport, open_broker
from nbtask.client.embedded import EmbeddedCluster
from nbtask.client.listener import Listener
from nbtask.client.live_workers import LiveWorkers
from nbtask.client.lost import LostTasks
from nbtask.client.reattach import settle_from_records
from nbtask.client.unsent import CLOSED_REASON, UNSENT_REASON, revoke_unsent
from nbtask.core.handle import TaskHandle
from nbtask.core.outgoing import MessageBuilder
from nbtask.errors import BrokerUnavailable, ConfigurationError, SendUnconfirmed
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer

__all__ = ["AppConnection"]

#: How long closing waits for the broker's answer to the revokes of tasks it did not
#: confirm: once it did not answer that long, the other revokes fail at once.
_CLOSING_ANSWER_SECONDS = 5.0


class AppConnection:
    """The connection part of :class:`~nbtask.client.app.App`, which documents it.

    Parameters
    ----------
    name
        The app's label, named in errors.
    settings
        The app's settings: its broker, its secret.
    """

    def __init__(self, name: str, settings: Settings) -> None:
        self.settings = settings
        self.name = name
        self.client_id = uuid.uuid4().hex[:16]
        self.cluster: EmbeddedCluster | None = None
        self._transport: Transport | None = None
        self._builder: MessageBuilder | None = None
        self._channel = ""  # set on connecting: see :attr:`channel`
        self._listener: Listener | None = None
        self._live: LiveWorkers | None = None
        #: True once :meth:`close` ran.
        self.closed = False
        self._lock = threading.RLock()
        atexit.register(_close_at_exit, weakref.ref(self))

    def connect(self) -> Transport:
        """Connect (starting the embedded cluster if no broker is configured)."""
        with self._lock:
            if self._transport is not None:
                return self._transport
            if self.closed:
                # Connecting again would start threads (and an embedded cluster) that
                # nothing closes.
                raise ConfigurationError(
                    f"app {self.name!r} is closed: make a new App to send or follow tasks"
                )
            settings = self.settings
            if settings.broker_url is None:
                self.cluster = EmbeddedCluster.shared(settings)
                url: str = self.cluster.url
                secret: str | None = self.cluster.secret
            else:
                url, secret = settings.broker_url, settings.secret
            opened: Transport | None = None
            try:
                signer = Signer.for_settings(settings, secret)
                transport = opened = open_broker(settings, url)
                transport.ping()
            except BaseException as exc:
                # Ctrl-C or no answer: what was opened is closed, and the cluster just
                # taken given back, not kept by an app that is not connected (connecting
                # again would take another).
                if opened is not None:
                    with contextlib.suppress(Exception):
                        opened.close()
                if self.cluster is not None:
                    self.cluster.release()
                    self.cluster = None
                if isinstance(exc, BrokerUnavailable):
                    # The message names the broker, the driver's reason and what to check:
                    # the driver's frames (and its own exception, chained) would bury it.
                    raise exc.with_traceback(None) from None
                raise
            self._builder = MessageBuilder(signer, settings, transport.store)
            self._channel = transport.store.channel_key(self.client_id)
            self._transport = transport
            self._live = LiveWorkers(transport.store, signer.key_id)
            return transport

    @property
    def transport(self) -> Transport:
        """The connected broker's transport (connects on first use)."""
        return self._transport or self.connect()

    @property
    def store(self) -> Store:
        """The connected broker's store: task records, the worker registry (connects)."""
        return self.transport.store

    @property
    def signer(self) -> Signer:
        """Signs messages and verifies events."""
        return self._message_builder().signer

    def _message_builder(self) -> MessageBuilder:
        # Read once connected: sending does not take the lock of connecting.
        if self._transport is None:
            self.connect()
        assert self._builder is not None
        return self._builder

    def _live_workers(self) -> LiveWorkers:
        if self._transport is None:
            self.connect()
        assert self._live is not None
        return self._live

    @property
    def channel(self) -> str:
        """The key of this client's event channel (connects on first use)."""
        if self._transport is None:
            self.connect()
        return self._channel

    def _listen(self) -> Listener:
        listener = self._listener
        if listener is not None and listener.alive:
            return listener
        with self._lock:
            if self._listener is None or not self._listener.alive:
                transport = open_broker(self.settings, self._url())
                recover = functools.partial(
                    settle_from_records,
                    store=transport.store,
                    signer=self.signer,
                    prefix=self.settings.key_prefix,
                )
                lost = LostTasks(
                    transport.store,
                    self.settings.key_prefix,
                    recover,
                    self._sends_in_doubt,
                    transport.still_queued,
                    self.settings.result_ttl,
                    ends_missing=self.transport.queues_beside_records,
                    heartbeat_interval=self.settings.heartbeat_interval,
                )
                self._listener = Listener(
                    transport, self.signer, self.channel, self.settings.key_prefix, recover, lost
                )
            return self._listener

    def _sends_in_doubt(self) -> set[str]:
        # The app's own transport: the publishes of its threads, not the listener's.
        transport = self._transport
        return transport.sends_in_doubt() if transport is not None else set()

    def _url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.settings.broker_url is not None
        return self.settings.broker_url

    def wait_for(
        self,
        handle: TaskHandle,
        timeout: float | None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Read events on this thread until ``handle`` is done, ``timeout`` passes or ``until()``.

        See :meth:`Listener.wait_for`; returns at once on a closed app.
        """
        if not self.closed:
            self._listen().wait_for(handle, timeout, until)

    def flush(self) -> None:
        """Wait until the broker answered for every task this thread sent.

        A lone ``delay()`` returns before RabbitMQ's confirm or Redis's reply; a task
        whose message was not delivered after all is revoked, its handle failing with
        ``TaskRevoked``.
        """
        if (transport := self._transport) is not None:
            try:
                transport.flush()
            finally:
                self._revoke_unsent()

    def _revoke_unsent(self, why: str = UNSENT_REASON, also: Sequence[str] = ()) -> None:
        # The tasks whose messages never reached the broker (and ``also``, in doubt): see
        # nbtask.client.unsent.
        if (transport := self._transport) is not None and (builder := self._builder) is not None:
            prefix, listener = self.settings.key_prefix, self._listener
            revoke_unsent(transport, builder.signer, self._channel, prefix, listener, why, also)

    def close(self) -> None:
        """:meth:`flush`, stop the listener, disconnect, give back an embedded cluster.

        What other threads sent without waiting and the broker has not confirmed yet is
        awaited a few seconds at most; those tasks still unconfirmed then are revoked,
        their handles failing with ``TaskRevoked`` (a ``get()`` waiting elsewhere too).
        """
        unconfirmed: tuple[str, ...] = ()
        try:
            self.flush()  # a failure is logged and its tasks' handles fail
        except SendUnconfirmed as exc:
            # The broker took them and said nothing (a thread that ended sent them, or
            # this one): in doubt, revoked below as other threads' unanswered sends are.
            unconfirmed = exc.task_ids
        except BrokerUnavailable:
            pass
        with self._lock:
            self.closed = True
            if self._transport is not None:
                # Before the listener stops: it holds the handles to fail.
                self._transport.settle_every_thread()
                # The store may be as silent as the broker was: one wait for it, not one
                # per task (a revoke it did not answer for fails the handle all the same).
                with self._transport.answers_within(_CLOSING_ANSWER_SECONDS):
                    self._revoke_unsent(CLOSED_REASON, unconfirmed)
            if self._listener is not None:
                self._listener.close()
                # Nothing reads their events now: a get() raises instead of waiting.
                for handle in self._listener.unfinished():
                    handle.unfollowed(self.name)
                self._listener = None
            self._live = None
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            if self.cluster is not None:
                self.cluster.release()
                self.cluster = None


def _close_at_exit(ref: weakref.ReferenceType[AppConnection]) -> None:
    app = ref()
    if app is not None:
        app.close()
