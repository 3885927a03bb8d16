"""The engine worker: the one thread that touches the model, the KV pool and the chats (none of them is
thread-safe). It runs calls between steps and interleaves the active generations at token granularity, with
continuous batching: `step()` advances every active generation to its next decode step (engine/batch.py: the
generation yields a DecodeRequest instead of running it; a new one prefills on the way), then runs all those
decode steps as one batched forward, so B concurrent clients cost about one forward per token, not B. A
generation that never asks for a decode step (a plain iterator of pieces) advances one piece per round.

The async side sees a `Stream`: events arrive on an asyncio queue (through `loop.call_soon_threadsafe`), and
`cancel()` makes the worker close the generator (a Chat rolls that turn back) before its next step."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from kvbound.engine.batch import DecodeRequest, decode_requests, serve
from kvbound.server.errors import ServerBusy

logger = logging.getLogger("kvbound.server")


class Task(Protocol):
    """One generation, as the worker runs it. All three methods run on the worker thread."""

    def start(self) -> Iterator[str]:
        """Admit the work (may raise) and return its text pieces."""

    def finish(self) -> Any:
        """After the pieces are exhausted: the result (the `done` event's value)."""

    def release(self) -> None:
        """Always last, after success, error or cancel: give back what `start` took."""


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" (value: str) | "done" (value: Task.finish()) | "error" (value: the exception)
    value: Any


class Stream:
    """The async handle on one generation."""

    def __init__(self, task: Task, loop: asyncio.AbstractEventLoop, worker: "Worker"):
        self.task, self.loop, self.worker = task, loop, worker
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.pieces: Iterator[str] | None = None  # set by the worker once started
        self.decoding = False  # it has asked for a decode step: each round advances it to its next one

    def post(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))
        except RuntimeError:  # the event loop closed (server shutting down)
            pass

    def cancel(self) -> None:
        """Stop this generation at the next step (safe from any thread; a no-op once it ended)."""
        self.cancelled = True
        self.worker.wake()

    async def next(self) -> Event:
        return await self.events.get()


class Worker:
    def __init__(self, max_active: int = 8, max_queued: int = 64, name: str = "kvbound-engine"):
        self.max_active, self.max_queued, self.name = max_active, max_queued, name
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._pending: deque[Stream] = deque()
        self._active: list[Stream] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # rounds of `step()` run (for tests and metrics)
        self.peak_active = 0
        self.batch_sizes: Counter[int] = Counter()  # sequences in a batched decode forward → forwards run

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every generation (their chats roll back) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the async side -----------------------------------------------------------------------------------------
    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the worker between steps and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopping:
                raise ServerBusy("the engine is shutting down; retry on the restarted server")
            self._calls.append((fn, future, loop))
            self._cond.notify()
        return await future

    def submit(self, task: Task) -> Stream:
        """Queue a generation; its events start arriving once a slot is free (at most `max_active` run)."""
        stream = Stream(task, asyncio.get_running_loop(), self)
        with self._cond:
            if self._stopping:
                raise ServerBusy("the engine is shutting down; retry on the restarted server")
            if len(self._pending) >= self.max_queued:
                raise ServerBusy(f"{len(self._pending)} requests are already waiting for the engine (the queue "
                                 f"holds {self.max_queued}); retry shortly", needed=1, available=0)
            self._pending.append(stream)
            self._cond.notify()
        return stream

    # -- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._calls or self._pending or self._active):
                    self._cond.wait()
                if self._stopping:
                    break
                calls, self._calls = self._calls, deque()
                starting = []
                while self._pending and len(self._active) + len(starting) < self.max_active:
                    starting.append(self._pending.popleft())
            for fn, future, loop in calls:
                self._settle(fn, future, loop)
            for stream in starting:
                self._start(stream)
            self.step()
        self._shutdown()

    def _settle(self, fn: Callable[[], Any], future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # noqa: BLE001 — every failure goes back to the caller
            result, error = None, e

        def resolve() -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass

    def _start(self, stream: Stream) -> None:
        if stream.cancelled:
            return
        try:
            stream.pieces = stream.task.start()
        except BaseException as e:  # noqa: BLE001
            self._end(stream, "error", e)
            return
        self._active.append(stream)
        self.peak_active = max(self.peak_active, len(self._active))

    def step(self) -> None:
        """One round: every active generation advances to its next decode step, in turn; then the steps
        gathered run as one batched forward and each generation finds its logits when next advanced."""
        if not self._active:
            return
        self.steps += 1
        requests = []
        for stream in list(self._active):
            if stream.cancelled:
                self._close(stream)
                continue
            request = self._advance(stream)
            if request is not None:
                requests.append(request)
        if requests:
            self.batch_sizes.update(serve(requests))

    def _advance(self, stream: Stream) -> DecodeRequest | None:
        """Post the pieces `stream` yields until it asks for a decode step (returned) or ends; one piece only
        from a generation that never asks."""
        while True:
            try:
                with decode_requests():
                    item = next(stream.pieces)
            except StopIteration:
                self._active.remove(stream)
                try:
                    result = stream.task.finish()
                except BaseException as e:  # noqa: BLE001
                    self._end(stream, "error", e)
                else:
                    self._end(stream, "done", result)
                return None
            except BaseException as e:  # noqa: BLE001
                self._active.remove(stream)
                self._end(stream, "error", e)
                return None
            if isinstance(item, DecodeRequest):
                stream.decoding = True
                return item
            stream.post("piece", item)
            if not stream.decoding:
                return None

    def _close(self, stream: Stream) -> None:
        """Cancel: closing the generator raises GeneratorExit inside it, so a Chat rolls the turn back."""
        self._active.remove(stream)
        try:
            stream.pieces.close()
        except BaseException:  # noqa: BLE001
            logger.exception("closing a cancelled generation failed")
        self._end(stream, "error", ServerBusy("the request was cancelled"))

    def _end(self, stream: Stream, kind: str, value: Any) -> None:
        try:
            stream.task.release()
        except BaseException:  # noqa: BLE001
            logger.exception("releasing a generation failed")
        stream.post(kind, value)

    def _shutdown(self) -> None:
        for stream in self._active:
            try:
                stream.pieces.close()
            except BaseException:  # noqa: BLE001
                pass
            self._end(stream, "error", ServerBusy("the server is shutting down"))
        for stream in self._pending:
            stream.post("error", ServerBusy("the server is shutting down"))
        for _, future, loop in self._calls:
            self._settle(_shutting_down, future, loop)
        self._active, self._pending, self._calls = [], deque(), deque()


def _shutting_down() -> Any:
    raise ServerBusy("the server is shutting down")
