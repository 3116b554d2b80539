"""A redis-server of a test's own (``PrivateRedis``), to stop, pause or reconfigure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

#: The redis-server a test starts for itself (``PrivateRedis``).
REDIS_SERVER = "/usr/bin/redis-server"


class PrivateRedis:
    """A redis-server of this test's own, to stop, start or reconfigure at will.

    For what must not touch the shared server: restarts, ``CONFIG SET maxmemory``.
    """

    def __init__(self, directory: Path, *, tls: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.directory / 'cert.pem'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *self._listen(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        """Stop the server's process (SIGSTOP): it takes what is sent and answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """End the server at once (a paused one too): what it took unanswered never runs."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def _listen(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        # A self-signed certificate for 127.0.0.1, which the client trusts by its URL.
        cert, key = self.directory / "cert.pem", self.directory / "key.pem"
        if not cert.exists():
            request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
            names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
            files = ["-keyout", str(key), "-out", str(cert)]
            subprocess.run([*request, *names, *files], check=True, capture_output=True)
        served = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no", *served]
