"""What every generation route does around its task, for the OpenAI routes (server/app.py) and Ollama's
(server/ollama.py) alike: check a chat request's messages, submit the task to the engine worker, wait for its first
event (then the response's headers can say 200) and collect the rest, cancelling it when the client goes away."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import Request

from kvbound.server.errors import ApiError

if TYPE_CHECKING:
    from kvbound.server.protocol import Message
    from kvbound.server.scheduler import Event, Stream, Task
    from kvbound.server.state import Server
    from kvbound.server.turns import TurnResult


def check_conversation(messages: list[Message], max_messages: int,
                       fewer: str = "a session keeps the history: see session_id") -> None:
    """A chat request's messages as kvbound's chats can take them (ApiError 400 naming the message): at most
    `max_messages`, a system message first only, ending with the message to answer. `fewer`: how to send fewer."""
    if len(messages) > max_messages:
        raise ApiError(400, f"the request has {len(messages):,} messages and this server takes at most "
                       f"{max_messages:,} in one request; send fewer ({fewer})",
                       param="messages", code="too_many_messages")
    system = ("system", "developer")
    for index, message in enumerate(messages[1:], start=1):
        if message.role in system:
            raise ApiError(400, f"messages[{index}] is a {message.role} message; only the first message may be one",
                           param=f"messages.{index}.role")
    last, at = messages[-1], f"messages.{len(messages) - 1}"
    alone = len(messages) == 1 and last.role in system  # a system (or developer) message alone: answered
    if last.role not in ("user", "tool") and not alone:
        raise ApiError(400, f"the last message is from '{last.role}'; a chat request ends with the user's "
                       "message to answer, or tool results (or is a system message alone)", param=f"{at}.role")
    if last.role != "tool" and not last.text().strip():
        raise ApiError(400, f"the last {last.role} message is empty; send some text", param=f"{at}.content")


# -- waiting on the worker --------------------------------------------------------------------------------------------
class DisconnectWatch:
    """While a route waits on a generation, cancel it if the client goes away (the Chat rolls the turn back)."""

    def __init__(self, request: Request, stream: Stream):
        self.request, self.stream = request, stream
        self.task: asyncio.Task | None = None

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.stream.cancel()
                return

    def __enter__(self) -> "DisconnectWatch":
        self.task = asyncio.create_task(self._watch())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.task.cancel()


def client_of(request: Request) -> str:
    """Who sent a request, for the fair share of the engine's slots: its API key, else its address."""
    key = request.headers.get("authorization")
    return f"key:{key}" if key else f"host:{request.client.host if request.client else ''}"


async def first_event(server: Server, task: Task, request: Request) -> tuple[Stream, Event]:
    """Submit `task` and wait for its first piece (headers can then say 200) or its error (raised)."""
    stream = server.worker.submit(task, client=client_of(request))
    try:
        with DisconnectWatch(request, stream):
            event = await stream.next()
    except BaseException:
        stream.cancel()
        raise
    if event.kind == "error":
        raise event.value
    return stream, event


async def collect(stream: Stream, event: Event, request: Request) -> TurnResult:
    try:
        with DisconnectWatch(request, stream):
            while event.kind == "piece":
                event = await stream.next()
    finally:
        stream.cancel()  # a no-op once the generation ended
    if event.kind == "error":
        raise event.value
    return event.value
