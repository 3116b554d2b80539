"""A loopback TCP proxy that a test controls, to drop connections and fake an outage.

Put it in front of a real service (Redis, RabbitMQ) and point clients at ``url_port``:
``cut()`` drops every live connection the way a network blip or a load balancer does,
``refuse()`` makes the service unreachable (connections are refused) until
``accept_again()``, ``deafen()`` drops what the service says back to clients (requests
still reach it: a reply, an AMQP publisher confirm, is lost on the way) until ``cut()``
(with ``new_ones=True``, on connections made later too, until ``hear()``), ``hold()``
keeps what clients send on live connections from the service until ``release()``.
The real service is never touched, so it stays shared by all tests. ``on_a_thread()``
runs a call that may wait on a silent service for ever, and fails the test if it does.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from helpers import wait_until

__all__ = ["TcpProxy", "on_a_thread", "proxying", "reply_lost_once", "via"]

_CHUNK = 1 << 16


def _free_port() -> int:
    """A free port below the kernel's ephemeral range.

    The proxy closes its listening socket while it refuses and binds the same port again
    afterwards; a port from the ephemeral range could meanwhile be taken as the local
    port of some outgoing connection, and the bind would fail.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free port for the TCP proxy")


class _Pair:
    """One proxied connection: the client's socket, the upstream one, and two pumps."""

    def __init__(
        self, client: socket.socket, upstream: socket.socket, on_close: Callable[[_Pair], None]
    ) -> None:
        self.sockets = (client, upstream)
        self._on_close = on_close
        self._closed = False
        self.deaf = False  # drop what the service sends back
        self.open = threading.Event()  # cleared: what the client sends waits here
        self.open.set()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        # Either side ending (or failing) ends the whole connection, both ways.
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if self.deaf and source is self.sockets[1]:
                    continue
                if source is self.sockets[0]:
                    self.open.wait()
                sink.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        """Close both sockets; shutdown() first wakes pumps blocked on them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.open.set()  # a pump held at the gate ends too, what it held lost
        self._on_close(self)

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            # A pair cut between its registration and start() has pumps not yet started.
            if thread.ident is not None and thread is not threading.current_thread():
                thread.join(timeout)


class TcpProxy:
    """Forwards ``127.0.0.1:url_port`` to ``target_host:target_port``, one pair per client.

    Threads only (one acceptor, two pumps per connection): tests stay in one process.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.url_port = _free_port()
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._accepting = threading.Event()
        self._deaf_to_new = False

    def start(self) -> None:
        """Listen and forward new connections."""
        self.accept_again()

    def cut(self) -> None:
        """Close every live connection both ways (both ends see it); keep accepting."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            pair.close()
        for pair in pairs:
            pair.join(5.0)

    def deafen(self, *, new_ones: bool = False) -> None:
        """Drop everything the service sends on live connections from now on.

        With ``new_ones``, on connections made from now on too, until :meth:`hear`.
        """
        with self._lock:
            self._deaf_to_new = self._deaf_to_new or new_ones
            for pair in self._pairs:
                pair.deaf = True

    def hear(self) -> None:
        """Connections made from now on hear the service again (see :meth:`deafen`)."""
        with self._lock:
            self._deaf_to_new = False

    def hold(self) -> None:
        """Keep what clients send on live connections from the service until release()."""
        with self._lock:
            for pair in self._pairs:
                pair.open.clear()

    def release(self) -> None:
        """Pass on what clients sent while held, and all they send from now on."""
        with self._lock:
            for pair in self._pairs:
                pair.open.set()

    def refuse(self) -> None:
        """Stop listening and close every connection: connecting fails until accept_again()."""
        self._accepting.clear()
        if self._acceptor is not None:
            self._acceptor.join(10.0)
            self._acceptor = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # connections queued but not accepted yet are reset
        self.cut()

    def accept_again(self) -> None:
        """Listen on the same port again."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.url_port))
        listener.listen(128)
        # accept() polls, so refuse() can stop the acceptor before closing the socket:
        # closing it under a blocked accept() does not wake that on every platform.
        listener.settimeout(0.05)
        self._listener = listener
        self._accepting.set()
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="tcp-proxy-accept", daemon=True
        )
        self._acceptor.start()

    def stop(self) -> None:
        """Stop listening and close every connection (the end of a test)."""
        self.refuse()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._accepting.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                client.close()  # the real service is down: so is the proxy's client
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream, self._forget)
            with self._lock:
                pair.deaf = self._deaf_to_new
                refused = not self._accepting.is_set()
                if not refused:
                    self._pairs.add(pair)
            if refused:
                pair.close()
                return
            pair.start()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)


@contextlib.contextmanager
def proxying(url: str, default_port: int) -> Iterator[TcpProxy]:
    """A started proxy in front of the service at ``url``; stopped after the block."""
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or default_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def reply_lost_once(proxy: TcpProxy, done: Callable[[], bool]) -> Iterator[None]:
    """In the block, the service's replies are lost; the connection drops once ``done()``.

    ``done`` says the service ran the command (looked at directly, not through the proxy).
    """
    proxy.deafen()  # on live connections: one made again after the cut hears the service

    def cut_once_done() -> None:
        wait_until(done, 30, "the service to run the command")
        proxy.cut()

    cutter = threading.Thread(target=cut_once_done, daemon=True)
    cutter.start()
    try:
        yield
    finally:
        cutter.join(40)
    assert not cutter.is_alive()


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by a proxy's (its user and password kept)."""
    parts = urlsplit(url)
    user = f"{parts.username}:{parts.password}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl()


def on_a_thread(call: Callable[[], object], *, cut: TcpProxy | None = None) -> BaseException | None:
    """Run ``call`` on a thread of its own (its own connections); what it raised.

    A call still waiting after a minute fails the test (the bound only tells a hang from
    an end: it is no speed target); the proxy ``cut``, if given, then cuts its
    connections, ending the wait.
    """
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # the test looks at what it raised
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    try:
        assert not thread.is_alive(), f"{call} still waits for the service's answer"
    finally:
        if cut is not None:
            cut.cut()  # (ends a wait that did not end)
            thread.join(30)
    assert len(raised) == 1
    return raised[0]
