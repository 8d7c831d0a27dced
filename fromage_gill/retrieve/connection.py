"""HTTP(S) connections for one fetch: pinned to an address that was checked, and every socket read bounded by
what is left of the fetch's total deadline, so a server dripping a byte at a time cannot hold it longer."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from typing import cast

# ------------------------------------------------------------------------------------------ one deadline


class DeadlinePassed(TimeoutError):
    """The fetch's total_timeout ran out (a TimeoutError, so http.client and socket.SocketIO treat it as one)."""


class Deadline:
    """One fetch's clock: every wait is at most its own step timeout and never past the end."""

    def __init__(self, total: float, read_timeout: float):
        self.end = time.monotonic() + total
        self.read_timeout = read_timeout

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, step: float) -> float:
        left = self.left()
        if left <= 0:
            raise DeadlinePassed("total timeout")
        return min(step, left)


class DeadlineSocket(socket.socket):
    """Sets its timeout to what is left (at most ``read_timeout``) before every read. http.client reads the status
    line, headers and chunk-size lines with readline, one recv at a time, so a per-socket timeout alone lets a
    server that sends a byte every few seconds hold the fetch for ever."""

    deadline: Deadline | None = None

    def recv_into(self, buffer, nbytes=0, flags=0):
        if self.deadline is not None:
            self.settimeout(self.deadline.timeout(self.deadline.read_timeout))
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize, flags=0):
        if self.deadline is not None:
            self.settimeout(self.deadline.timeout(self.deadline.read_timeout))
        return super().recv(bufsize, flags)


class DeadlineSSLSocket(ssl.SSLSocket):
    """The same for TLS (an SSLContext makes these through ``sslsocket_class``); a TLS read waits for whole records,
    within its timeout."""

    deadline: Deadline | None = None

    def recv_into(self, buffer, nbytes=None, flags=0):
        if self.deadline is not None:
            self.settimeout(self.deadline.timeout(self.deadline.read_timeout))
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen=1024, flags=0):
        if self.deadline is not None:
            self.settimeout(self.deadline.timeout(self.deadline.read_timeout))
        return super().recv(buflen, flags)


def open_socket(address: str, port: int, deadline: Deadline, connect_timeout: float) -> DeadlineSocket:
    raw = socket.create_connection((address, port), deadline.timeout(connect_timeout))
    sock = DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock.settimeout(deadline.timeout(connect_timeout))  # for the TLS handshake and sending the request
    return sock


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address that was already checked, whatever ``host`` resolves to now, under ``deadline``."""

    def __init__(self, host: str, port: int, address: str, deadline: Deadline, connect_timeout: float):
        super().__init__(host, port, timeout=connect_timeout)
        self._address, self._deadline, self._connect_timeout = address, deadline, connect_timeout

    def connect(self):
        self.sock = open_socket(self._address, self.port, self._deadline, self._connect_timeout)
        self.sock.deadline = self._deadline


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(
        self, host: str, port: int, address: str, deadline: Deadline, connect_timeout: float, context: ssl.SSLContext
    ):
        super().__init__(host, port, timeout=connect_timeout, context=context)
        self._address, self._deadline, self._connect_timeout = address, deadline, connect_timeout
        self._pinned_context = context

    def connect(self):
        sock = open_socket(self._address, self.port, self._deadline, self._connect_timeout)
        # the certificate is checked for the host; the context's sslsocket_class makes a DeadlineSSLSocket
        sock = cast(DeadlineSSLSocket, self._pinned_context.wrap_socket(sock, server_hostname=self.host))
        sock.deadline = self._deadline
        self.sock = sock
