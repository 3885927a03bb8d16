"""The HTTP layer: a request whose headers do not arrive in time gets 408 and its connection closed (a complete
request on the same server is unaffected); a busy port is one error line from `kvbound serve`, before any model
loads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI

from kvbound.server.http import bind, with_header_timeout


@pytest.fixture
def server():
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    sock = bind("127.0.0.1", 0)
    live = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=with_header_timeout(0.5)))
    thread = threading.Thread(target=live.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not live.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    live.should_exit = True
    thread.join(30)


def exchange(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            if data.endswith(b"\r\n\r\n") and b"\r\n\r\n" in received:
                break
        return received


@pytest.mark.parametrize("partial", [b"", b"GET /ping HTTP/1.1\r\nHost: x\r\n", b"GE"])
def test_late_headers_get_408_and_a_closed_connection(server, partial):
    started = time.monotonic()
    received = exchange(server, partial)
    assert received.startswith(b"HTTP/1.1 408"), received
    body = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "headers" in body["error"]["message"]
    assert time.monotonic() - started < 4.5  # closed by the server, not by the client's own timeout


def test_a_whole_request_is_answered(server):
    received = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200") and b'{"ok":true}' in received


def test_bad_header_timeout_is_refused():
    with pytest.raises(ValueError, match="header timeout"):
        with_header_timeout(0)


def test_serve_on_a_busy_port_is_one_error_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "kvbound", "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: port") and "in use" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "uvicorn" not in result.stderr.lower()
