"""The HTTP layer under the app: a listening socket bound before the model loads (a busy port is one clear error,
not uvicorn's log lines), and uvicorn's h11 protocol with a deadline for a request's headers (408: a client that
trickles or never finishes its headers holds nothing). The body's own deadline is middleware (BodyLimit)."""

from __future__ import annotations

import errno
import json
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvbound.errors import KvboundError
from kvbound.server.protocol import error_body

DEFAULT_HEADER_TIMEOUT_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); KvboundError saying what to do if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise KvboundError(f"port {port} on {host} is in use (another server?); stop it or choose another "
                               "--port (0 picks a free one)") from None
        raise KvboundError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def with_header_timeout(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that answers 408 and closes when a request's headers are not whole `timeout_s`
    after the connection opened or the previous response ended."""
    if timeout_s <= 0:
        raise ValueError(f"the header timeout must be a positive number of seconds, got {timeout_s!r}")
    body = json.dumps(error_body(f"the request headers did not arrive within {timeout_s:g} s; send them whole",
                                 code="request_timeout")).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeout(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(timeout_s, self._headers_late)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's headers get the same time
                self._header_deadline.cancel()
                self._header_deadline = self.loop.call_later(timeout_s, self._headers_late)

        def connection_lost(self, exc) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return HeaderTimeout


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, sock: socket.socket | None = None) -> None:
    """Serve `app` with uvicorn on `sock` (bound here if not given) until interrupted (Ctrl-C is the normal way to
    stop: it returns quietly)."""
    import signal
    import threading

    import uvicorn

    sock = sock if sock is not None else bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, http=with_header_timeout(header_timeout_s)))
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn shuts down on Ctrl-C, then raises the signal again for the handler it found; Python's default one would
    # turn a clean shutdown into a KeyboardInterrupt traceback, so a no-op handler stands in while it runs.
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGINT, previous)
        sock.close()
