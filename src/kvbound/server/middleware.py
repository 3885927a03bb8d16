"""ASGI middleware in front of the routes: count every request by route and status, answer any unexpected failure
with a 500, check the bearer API key, and cap the request body (read whole, up to the limit, before any route sees
it). Answers in OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvbound.kvcache.spec import format_bytes
from kvbound.server.errors import error_response
from kvbound.server.protocol import error_body

logger = logging.getLogger("kvbound.server")


async def send_error(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


CLIENT_CLOSED = 499  # nginx's status for a request its client abandoned before any response: not a server error


class RequestCounter:
    """Counts `(route template, status)` of every HTTP request: an exception escaping the app counts as 500, a
    request the client abandoned before any response (it closed mid-body) as 499."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None], route_of: Callable[[Scope], str]):
        self.app, self.count, self.route_of = app, count, route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = CLIENT_CLOSED

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            status = 500 if status == CLIENT_CLOSED else status
            raise
        finally:
            if status == CLIENT_CLOSED:
                logger.info("%s %s: the client closed the connection before a response", scope.get("method"),
                            scope.get("path"))
            self.count(self.route_of(scope), status)


class CatchAll:
    """An exception no handler took: logged with its traceback, answered with a 500 in OpenAI's shape (no details),
    and not raised further, so the server's own error page never shows and the connection stays usable."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001
            if started:  # too late for a status: let the server end the response
                raise
            await error_response(error)(scope, receive, send)


class ApiKey:
    """Every path but the public ones needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str | None, is_public: Callable[[str], bool]):
        self.app, self.key, self.is_public = app, key.encode() if key else None, is_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or self.is_public(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            what = "no API key was given" if not header else "the API key is not valid"
            return await send_error(send, 401, f"{what}; send the server's key as 'Authorization: Bearer KEY'",
                                    "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) a body over `limit` bytes, by its Content-Length or as it arrives, and (408) one not whole within
    `timeout_s` of the request's start; the app gets it whole."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, f"{int(length):,} bytes")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.timeout_s:g} s "
                                        f"({size:,} bytes came); send it whole", "request_timeout",
                                        [(b"connection", b"close")])
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(send, f"over {size:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client's disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        await send_error(send, 413, f"the request body is {size} and the limit is {self.limit:,} bytes "
                         f"({format_bytes(self.limit)}); send less or raise --max-body", "request_too_large")
