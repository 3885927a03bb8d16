"""The engine worker: one thread, generations interleaved a step at a time (round-robin), a cancelled turn
aborted at once and released, a failing start reported as an error event — and, through the
HTTP server, concurrent clients that all progress and get exactly the replies they get alone."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import torch

from kvbound.engine.generate import Turn
from kvbound.server.errors import PoolBusy, ServerBusy
from kvbound.server.scheduler import Worker
from tests.server.conftest import NO_STOP


class FakeRunner:
    """The logits of a token are the token id itself; records the caches (names) of every forward it runs."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def decode(self, token_id: int, cache: list[str]) -> torch.Tensor:
        self.batches.append([cache[0]])
        return torch.tensor([float(token_id)])

    def decode_batch(self, token_ids: list[int], caches: list[list[str]]) -> torch.Tensor:
        self.batches.append([c[0] for c in caches])
        return torch.tensor([[float(t)] for t in token_ids])


class FakeDecoder:
    """`steps` decode steps feeding tokens 0, scale, 2*scale, ...; each step's piece is the name and the logits
    it got (the token itself, from FakeRunner), recorded into a shared log."""

    def __init__(self, name: str, steps: int, log: list[str], runner: FakeRunner, scale: int = 1):
        self.name, self.steps, self.log, self.runner, self.scale = name, steps, log, runner, scale
        self.cache, self.token, self.fed = [name], 0, 0

    @property
    def done(self) -> bool:
        return self.token is None

    def feed(self, logits: torch.Tensor) -> str:
        piece = f"{self.name}{int(logits[0])}"
        self.log.append(piece)
        self.fed += 1
        self.token = None if self.fed == self.steps else self.fed * self.scale
        return piece

    def step(self) -> str:
        return self.feed(self.runner.decode(self.token, self.cache))

    def take_logprobs(self) -> list:
        return []


class FakeTask:
    """A turn of `pieces` steps; its commit and abort both log `<name>-closed`."""

    def __init__(self, name: str, pieces: int, log: list[str], fail: bool = False, runner: FakeRunner | None = None,
                 scale: int = 1):
        self.name, self.pieces, self.log, self.fail = name, pieces, log, fail
        self.runner, self.scale = runner or FakeRunner(), scale
        self.released = 0
        self.thread: str | None = None

    def start(self) -> Turn:
        if self.fail:
            raise ValueError(f"{self.name} cannot start")
        self.thread = threading.current_thread().name
        close = lambda: self.log.append(f"{self.name}-closed")  # noqa: E731
        return Turn(FakeDecoder(self.name, self.pieces, self.log, self.runner, self.scale), close, close)

    def finish(self, result: Any) -> str:
        return f"{self.name}-done"

    def release(self) -> None:
        self.released += 1


async def drain(stream) -> list[Any]:
    events = []
    while True:
        event = await stream.next()
        events.append((event.kind, event.value))
        if event.kind != "piece":
            return events


def run(coro) -> Any:
    return asyncio.run(coro)


def run_all(tasks: list, max_active: int = 8, clients: list[str] | None = None) -> list[list[Any]]:
    """Queue `tasks` (each as `clients`' one, if given) before the worker starts, so they all compete from the
    first round, and run them to the end; each task's events."""
    async def main() -> list[list[Any]]:
        worker = Worker(max_active=max_active)
        streams = [worker.submit(task, client) for task, client in zip(tasks, clients or [""] * len(tasks))]
        worker.start()
        try:
            return await asyncio.gather(*(drain(s) for s in streams))
        finally:
            worker.stop()

    return run(main())


def test_generations_interleave_round_robin() -> None:
    log: list[str] = []
    tasks = [FakeTask(name, 3, log) for name in "abc"]
    results = run_all(tasks)
    assert log[:9] == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    for task, events in zip(tasks, results, strict=True):
        assert events == [("piece", f"{task.name}{i}") for i in range(3)] + [("done", f"{task.name}-done")]
        assert task.released == 1 and task.thread == "kvbound-engine"


def test_max_active_queues_the_rest() -> None:
    log: list[str] = []
    tasks = [FakeTask(name, 2, log) for name in "ab"]
    run_all(tasks, max_active=1)
    assert log == ["a0", "a1", "a-closed", "b0", "b1", "b-closed"]


def test_cancel_aborts_the_turn_and_releases() -> None:
    log: list[str] = []
    task = FakeTask("a", 10_000, log)

    async def main() -> list[Any]:
        worker = Worker()
        worker.start()
        try:
            stream = worker.submit(task)
            first = await stream.next()
            stream.cancel()
            rest = await drain(stream)
            return [(first.kind, first.value)] + rest
        finally:
            worker.stop()

    events = run(main())
    assert events[0] == ("piece", "a0")
    kind, error = events[-1]
    assert kind == "error" and isinstance(error, ServerBusy) and "cancelled" in str(error)
    assert log[-1] == "a-closed" and len(log) < 10_000 and task.released == 1


def test_failing_start_is_an_error_event_and_calls_run_between_steps() -> None:
    log: list[str] = []
    task = FakeTask("bad", 1, log, fail=True)

    async def main() -> tuple[list[Any], str, Exception | None]:
        worker = Worker()
        worker.start()
        try:
            events = await drain(worker.submit(task))
            name = await worker.call(lambda: threading.current_thread().name)
            try:
                await worker.call(lambda: 1 / 0)
            except ZeroDivisionError as e:
                return events, name, e
            return events, name, None
        finally:
            worker.stop()

    events, thread, error = run(main())
    assert events[0][0] == "error" and "cannot start" in str(events[0][1])
    assert task.released == 1 and thread == "kvbound-engine" and isinstance(error, ZeroDivisionError)


class BusyTask(FakeTask):
    """Admission says the pool is busy while `busy()` is true; then a turn like FakeTask's."""

    def __init__(self, name: str, busy, log: list[str]):
        super().__init__(name, 2, log)
        self.busy, self.tries = busy, 0

    def start(self) -> Turn:
        self.tries += 1
        if self.busy():
            raise PoolBusy("the shared KV pool has 0 blocks free", needed=3, available=0)
        return super().start()


def test_a_request_the_pool_cannot_take_yet_waits_its_turn() -> None:
    """PoolBusy sends a task back to the queue (released, its place kept) until a running turn ends; then it runs.
    With a queue timeout of 0 the same task ends in a ServerBusy that says how long it waited."""
    log: list[str] = []
    long = FakeTask("long", 30, log)

    async def main(timeout: float) -> list[Any]:
        worker = Worker(max_active=4, queue_timeout_s=timeout)
        first = worker.submit(long)
        waiting = BusyTask("w", lambda: "long-closed" not in log, log)
        second = worker.submit(waiting)
        worker.start()
        try:
            return [await drain(first), await drain(second), waiting]
        finally:
            worker.stop()

    _, events, waiting = run(main(60.0))
    assert events == [("piece", "w0"), ("piece", "w1"), ("done", "w-done")]
    assert waiting.tries >= 2 and waiting.released == waiting.tries  # released before each retry, and at the end
    assert log.index("long-closed") < log.index("w0")
    log.clear()
    long = FakeTask("long", 30, log)
    _, events, _ = run(main(0.0))
    kind, error = events[-1]
    assert kind == "error" and isinstance(error, ServerBusy) and "waited" in str(error) and error.retry_after_s > 0


def test_full_queue_refuses() -> None:
    async def main() -> None:
        worker = Worker(max_active=1, max_queued=1)  # not started: nothing leaves the queue
        worker.submit(FakeTask("a", 1, []))
        try:
            worker.submit(FakeTask("b", 1, []))
        except ServerBusy as e:
            assert "queue" in str(e)
        else:
            raise AssertionError("a full queue accepted a request")

    run(main())


# -- over HTTP -------------------------------------------------------------------------------------------------------
def stream_reply(server, text: str, max_tokens: int, arrivals: list[tuple[float, str]]) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0, "logit_bias": NO_STOP}
    pieces = []
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": "' in line:
                arrivals.append((time.monotonic(), text))
                pieces.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["delta"]["content"])
    return "".join(pieces)


def test_concurrent_clients_all_progress_and_get_their_own_replies(server) -> None:
    prompts = ["first client", "second client", "third client"]
    alone = {p: stream_reply(server, p, 300, []) for p in prompts}
    arrivals: list[tuple[float, str]] = []
    replies: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: replies.__setitem__(p, stream_reply(server, p, 300, arrivals)))
               for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert replies == alone  # interleaving in one pool changes no reply
    first = {p: min(t for t, q in arrivals if q == p) for p in prompts}
    last = {p: max(t for t, q in arrivals if q == p) for p in prompts}
    assert max(first.values()) < min(last.values())  # every client got text before any finished
    assert server.memory()["engine"]["peak_active"] >= 2


class SteppedTask(FakeTask):
    """A task whose prefill runs in `chunks` steps (as Chat.begin does), logging each chunk; closed midway it logs
    `<name>-rolled-back` (as a Chat rolls the turn back)."""

    def __init__(self, name: str, chunks: int, pieces: int, log: list[str], gate: threading.Event | None = None):
        super().__init__(name, pieces, log)
        self.chunks, self.gate = chunks, gate

    def start(self):
        turn = super().start()

        def prefill():
            try:
                for chunk in range(self.chunks):
                    self.log.append(f"{self.name}-chunk{chunk}")
                    if self.gate is not None and chunk == 2:
                        self.gate.wait(30)  # the chunk "takes" until the test lets it end
                    yield
            except GeneratorExit:
                self.log.append(f"{self.name}-rolled-back")
                raise
            return turn
        return prefill()


def test_a_long_prefill_is_interleaved_with_the_other_decodes() -> None:
    log: list[str] = []
    long, short = SteppedTask("L", chunks=4, pieces=1, log=log), FakeTask("s", 4, log)
    run_all([long, short])
    # one chunk of the long prompt per round, the short turn's tokens in between (not after all four chunks)
    assert log[:8] == ["L-chunk0", "s0", "L-chunk1", "s1", "L-chunk2", "s2", "L-chunk3", "s3"], log
    assert log.index("L0") > log.index("L-chunk3") and long.released == 1 and short.released == 1


def test_a_cancelled_prefill_is_rolled_back_and_released() -> None:
    log: list[str] = []
    gate = threading.Event()
    long = SteppedTask("L", chunks=10, pieces=1, log=log, gate=gate)

    async def main() -> list[Any]:
        worker = Worker(max_active=8)
        stream = worker.submit(long)
        worker.start()
        try:
            while "L-chunk2" not in log:
                await asyncio.sleep(0.001)
            stream.cancel()
            gate.set()
            return await drain(stream)
        finally:
            worker.stop()

    events = run(main())
    assert events[-1][0] == "error" and isinstance(events[-1][1], ServerBusy)
    assert "L-rolled-back" in log and "L0" not in log and long.released == 1


def test_free_slots_go_to_the_client_with_the_fewest_running() -> None:
    """A client that queued many requests first does not take every slot: the other's one request starts next."""
    log: list[str] = []
    greedy = [FakeTask(f"g{i}", 2, log) for i in range(4)]
    other = FakeTask("o", 2, log)
    run_all([*greedy, other], max_active=2, clients=["greedy"] * len(greedy) + ["other"])
    firsts = [piece for piece in log if piece.endswith("0") and "-" not in piece]
    assert firsts[:2] == ["g00", "o0"], log  # the second slot went to the other client, not to g1
    assert all(t.released == 1 for t in [*greedy, other])
