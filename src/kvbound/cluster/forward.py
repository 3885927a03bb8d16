"""A forwarded HTTP request and the pieces of its response, as plain picklable values (they cross Ray between the
ingress and a replica), and `call_asgi`: one request answered by an in-process ASGI app (a replica's kvbound app),
its response given back as it is produced. Knows nothing of Ray, sessions or routing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the ingress received it."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names, hop-by-hop ones left out
    body: bytes = b""

    @classmethod
    def of(cls, method: str, path: str, query: str = "", headers: Any = (), body: bytes = b"") -> "Forwarded":
        kept = tuple((k.lower(), v) for k, v in (headers.items() if hasattr(headers, "items") else headers)
                     if k.lower() not in HOP_BY_HOP)
        return cls(method.upper(), path, query, kept, body)


@dataclass
class Head:
    """The start of a response: status, headers, and its first body bytes; `more` says whether chunks follow."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    more: bool = False

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


def _scope(request: Forwarded) -> dict[str, Any]:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
    headers.append((b"content-length", str(len(request.body)).encode()))
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "query_string": request.query.encode("latin-1"), "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 0), "server": ("kvbound-replica", 80), "state": {}}


async def call_asgi(app: Any, request: Forwarded) -> AsyncIterator[Head | bytes]:
    """Run `request` through `app`; yield its Head (with the first body bytes), then each further body chunk.
    Closing the iterator early is the client going away: the app sees `http.disconnect` (a generation in progress
    is cancelled and its turn rolled back), then the app's task is cancelled if it lingers."""
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        start = await sent.get()
        if start is None:  # the app ended without a response (it cannot, behind kvbound's CatchAll)
            await task
            raise RuntimeError(f"the app sent no response to {request.method} {request.path}")
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in start.get("headers", [])]
        head = Head(start["status"], headers)
        first = await sent.get()
        if first is not None:
            head.body, head.more = first.get("body", b""), first.get("more_body", False)
        yield head
        while head.more:
            message = await sent.get()
            if message is None:
                break
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                break
        await task
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001 — the app's own failure; the response already went out
                pass
