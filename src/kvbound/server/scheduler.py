"""The engine worker: the one thread that touches the model, the KV pool and the chats (none of them is
thread-safe). It runs calls between steps and interleaves the active generations at token granularity, with
continuous batching: a task starts by prefilling its turn (engine/generate.Turn), then each `step()` feeds the
waiting token of every active turn in one batched forward (engine/batch.py), so B concurrent clients cost
about one forward per token, not B. A prefill given as steps (Chat.begin, LLM.begin_raw) runs one chunk per round,
the prefilling tasks taking turns, between the decode steps: a long prompt delays the others' next tokens by one
chunk's time, not by its whole prefill.

A task whose turn cannot get room in the shared KV pool yet (admission raises PoolBusy) waits in the queue, first
come first served, and is tried again whenever a turn ends; past `queue_timeout_s` it is answered 429 with a
Retry-After from the turns' measured length. The async side sees a `Stream`: events arrive on an asyncio queue
(through `loop.call_soon_threadsafe`), and `cancel()` makes the worker abort the turn (a Chat rolls it back)
before its next step."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from kvbound.engine import batch
from kvbound.engine.generate import Turn
from kvbound.server.errors import PoolBusy, ServerBusy

logger = logging.getLogger("kvbound.server")
RETRY_S = 0.1  # with nothing running, how often the waiting are tried again


class Task(Protocol):
    """One generation, as the worker runs it. All three methods run on the worker thread."""

    def start(self) -> Turn | Generator[None, None, Turn]:
        """Admit the work (may raise PoolBusy: the task waits) and prefill it: the turn ready to decode, or a
        generator that prefills one chunk per step and returns it."""

    def finish(self, result: Any) -> Any:
        """After the turn committed (`result`: what its commit returned): the `done` event's value."""

    def release(self) -> None:
        """Always last, after success, error or cancel: give back what `start` took."""


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" (value: str) | "done" (value: Task.finish()) | "error" (value: the exception)
    value: Any
    logprobs: tuple = ()  # of a piece: its tokens' TokenLogprobs, when the generation asked for them


class Stream:
    """The async handle on one generation."""

    def __init__(self, task: Task, loop: asyncio.AbstractEventLoop, worker: "Worker", client: str = ""):
        self.task, self.loop, self.worker, self.client = task, loop, worker, client
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.turn: Turn | None = None  # set by the worker once prefilled
        self.prefill: Generator[None, None, Turn] | None = None  # while the prefill runs in steps
        self.submitted = time.monotonic()
        self.waits = 0  # times admission sent it back to the queue
        self.busy: PoolBusy | None = None  # why it waits
    def post(self, kind: str, value: Any, logprobs: tuple = ()) -> None:
        """From the worker thread: hand an event to the loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value, logprobs))
        except RuntimeError:  # the event loop closed (server shutting down)
            pass

    def cancel(self) -> None:
        """Stop this generation at the next step (safe from any thread; a no-op once it ended)."""
        self.cancelled = True
        self.worker.wake()

    async def next(self) -> Event:
        return await self.events.get()


class Worker:
    def __init__(self, max_active: int = 8, max_queued: int = 64, name: str = "kvbound-engine",
                 queue_timeout_s: float = 60.0):
        self.max_active, self.max_queued, self.name = max_active, max_queued, name
        self.queue_timeout_s = queue_timeout_s
        self._waiting: deque[Stream] = deque()  # admitted to the queue, waiting for room in the KV pool
        self._room_changed = True  # a turn ended since the waiting ones were last tried
        self.mean_turn_s = 1.0  # mean time from submission to end, queue wait included (Retry-After)
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._pending: deque[Stream] = deque()
        self._active: list[Stream] = []
        self._prefilling: deque[Stream] = deque()  # started, prefilling one chunk per round, oldest first
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
        """Generations running: decoding, or prefilling in steps."""
        return len(self._active) + len(self._prefilling)

    @property
    def queued(self) -> int:
        return len(self._pending) + len(self._waiting)

    def retry_after_s(self) -> float:
        """When a refused client should try again: the turns ahead of it, over the slots, at the measured length."""
        return self.mean_turn_s * (1 + self.queued / max(1, self.max_active))

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

    def submit(self, task: Task, client: str = "") -> Stream:
        """Queue a generation; its events start arriving once a slot is free (at most `max_active` run). Free slots
        go to the client (an API key, an address) with the fewest generations running, oldest request first: one
        client sending many requests at once cannot take every slot from the others."""
        stream = Stream(task, asyncio.get_running_loop(), self, client)
        with self._cond:
            if self._stopping:
                raise ServerBusy("the engine is shutting down; retry on the restarted server")
            if self.queued >= self.max_queued:
                raise ServerBusy(f"{self.queued} requests are already waiting for the engine (the queue holds "
                                 f"{self.max_queued}); retry shortly", needed=1, available=0,
                                 retry_after_s=self.retry_after_s())
            self._pending.append(stream)
            self._cond.notify()
        return stream

    # -- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._calls or self._pending or self._active or self._prefilling
                           or (self._waiting and self._room_changed)):
                    if not self._waiting:
                        self._cond.wait()
                    elif not self._cond.wait(RETRY_S):  # nothing runs: try the waiting again now and then
                        self._room_changed = True
                if self._stopping:
                    break
                self._expire_waiting()
                calls, self._calls = self._calls, deque()
                starting = []
                if self._room_changed or not self.active:  # the waiting go first, in order
                    while self._waiting and self.active + len(starting) < self.max_active:
                        starting.append(self._waiting.popleft())
                    self._room_changed = False
                while self._pending and self.active + len(starting) < self.max_active:
                    starting.append(self._fairest(starting))
            for fn, future, loop in calls:
                self._settle(fn, future, loop)
            for stream in starting:
                self._start(stream)
            self.step()
        self._shutdown()

    def _fairest(self, starting: list[Stream]) -> Stream:
        """Take the oldest pending request of the client with the fewest generations running or starting."""
        running = Counter(s.client for s in [*self._active, *self._prefilling, *starting])
        stream = min(self._pending, key=lambda s: running[s.client])  # min keeps the first of equals: the oldest
        self._pending.remove(stream)
        return stream

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
            self._end(stream, "error", ServerBusy("the request was cancelled"))
            return
        try:
            started = stream.task.start()
        except PoolBusy as e:
            self._wait_for_room(stream, e)
            return
        except BaseException as e:  # noqa: BLE001
            self._end(stream, "error", e)
            return
        if isinstance(started, Generator):
            stream.prefill = started
            self._prefilling.append(stream)
        else:
            stream.turn = started
            self._active.append(stream)
        self.peak_active = max(self.peak_active, self.active)

    def _prefill_one(self) -> None:
        """One chunk of the oldest prefilling task's prompt; then it goes to the back (or, prefilled, decodes)."""
        for stream in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(stream)
            self._stop_prefill(stream, ServerBusy("the request was cancelled"))
        if not self._prefilling:
            return
        stream = self._prefilling.popleft()
        try:
            next(stream.prefill)
        except StopIteration as done:
            stream.turn, stream.prefill = done.value, None
            self._active.append(stream)
            return
        except BaseException as e:  # noqa: BLE001 — the turn rolled itself back
            self._room_changed = True
            self._end(stream, "error", e)
            return
        self._prefilling.append(stream)

    def _stop_prefill(self, stream: Stream, error: BaseException) -> None:
        """Close a prefill midway (a Chat rolls its turn back, a raw completion frees its cache) and end it."""
        stream.prefill.close()
        self._room_changed = True
        self._end(stream, "error", error)

    def _wait_for_room(self, stream: Stream, busy: PoolBusy) -> None:
        """Back into the queue (its place kept) until a turn ends, or a 429 once it waited queue_timeout_s."""
        try:
            stream.task.release()
        except BaseException:  # noqa: BLE001
            logger.exception("releasing a waiting generation failed")
        stream.waits += 1
        stream.busy = busy
        self._waiting.append(stream)

    def _expire_waiting(self) -> None:
        """A waiting request past queue_timeout_s (or cancelled) leaves the queue now, not when room frees."""
        now = time.monotonic()
        for stream in [s for s in self._waiting if s.cancelled or now - s.submitted >= self.queue_timeout_s]:
            self._waiting.remove(stream)
            if stream.cancelled:
                stream.post("error", ServerBusy("the request was cancelled"))
                continue
            busy = stream.busy
            stream.post("error", ServerBusy(
                f"{busy} (waited {now - stream.submitted:.1f} s in the queue, the most a request waits: "
                f"{self.queue_timeout_s:g} s)", needed=busy.needed, available=busy.available,
                retry_after_s=self.retry_after_s()))

    def step(self) -> None:
        """One round: the waiting token of every active turn, fed in one batched forward; each stream gets its
        text, and a turn that finished commits."""
        self._prefill_one()
        for stream in [s for s in self._active if s.cancelled]:
            self._abort(stream, ServerBusy("the request was cancelled"))
        if not self._active:
            return
        self.steps += 1
        streams = list(self._active)
        outcomes, sizes = batch.step([s.turn.decoder for s in streams])
        self.batch_sizes.update(sizes)
        for stream, outcome in zip(streams, outcomes):
            if outcome.error is not None:
                self._abort(stream, outcome.error)
                continue
            if outcome.piece or outcome.logprobs:
                stream.post("piece", outcome.piece, outcome.logprobs)
            if stream.turn.decoder.done:
                self._active.remove(stream)
                self._room_changed = True
                held = time.monotonic() - stream.submitted
                self.mean_turn_s += 0.2 * (held - self.mean_turn_s)
                try:
                    result = stream.task.finish(stream.turn.commit())
                except BaseException as e:  # noqa: BLE001
                    self._end(stream, "error", e)
                else:
                    self._end(stream, "done", result)

    def _abort(self, stream: Stream, error: BaseException) -> None:
        """Undo the turn (a Chat rolls it back) and end the stream with `error`."""
        self._active.remove(stream)
        self._room_changed = True
        try:
            stream.turn.abort()
        except BaseException:  # noqa: BLE001
            logger.exception("aborting a generation failed")
        self._end(stream, "error", error)

    def _end(self, stream: Stream, kind: str, value: Any) -> None:
        try:
            stream.task.release()
        except BaseException:  # noqa: BLE001
            logger.exception("releasing a generation failed")
        stream.post(kind, value)

    def _shutdown(self) -> None:
        for stream in list(self._active):
            self._abort(stream, ServerBusy("the server is shutting down"))
        for stream in self._prefilling:
            self._stop_prefill(stream, ServerBusy("the server is shutting down"))
        self._prefilling = deque()
        for stream in [*self._pending, *self._waiting]:
            stream.post("error", ServerBusy("the server is shutting down"))
        for _, future, loop in self._calls:
            self._settle(_shutting_down, future, loop)
        self._active, self._pending, self._waiting, self._calls = [], deque(), deque(), deque()


def _shutting_down() -> Any:
    raise ServerBusy("the server is shutting down")
