"""Continuous batching on the engine worker: each round gathers the decode steps of every active generation and
runs them as one forward (a fake runner shows the grouping); over HTTP, concurrent clients — chat sessions in the
shared pool and a raw completion in a cache of its own — get exactly the replies they get alone, while the memory
document and /metrics show that batches of several sequences ran."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from kvbound.server.scheduler import Worker
from tests.server.conftest import NO_STOP
from tests.server.test_scheduler import FakeRunner, FakeTask, drain


def test_each_round_runs_the_decode_steps_of_all_generations_as_one_batch() -> None:
    runner = FakeRunner()
    tasks = [FakeTask(name, steps, [], runner=runner, scale=10) for name, steps in (("a", 3), ("b", 2), ("c", 3))]

    async def main() -> tuple[list[list[Any]], Worker]:
        worker = Worker(max_active=8)
        streams = [worker.submit(task) for task in tasks]  # queued before the thread starts: all start together
        worker.start()
        try:
            return await asyncio.gather(*(drain(s) for s in streams)), worker
        finally:
            worker.stop()

    results, worker = asyncio.run(main())
    assert runner.batches == [["a", "b", "c"], ["a", "b", "c"], ["a", "c"]]
    assert worker.batch_sizes == {3: 2, 2: 1}
    assert results[0] == [("piece", "a0"), ("piece", "a10"), ("piece", "a20"), ("done", "a-done")]
    assert results[1] == [("piece", "b0"), ("piece", "b10"), ("done", "b-done")]


def test_a_cancelled_generation_leaves_the_batch() -> None:
    """Driven step by step (no thread): a cancel between rounds closes the generation before the next batch."""
    runner = FakeRunner()

    async def main() -> list[list[str]]:
        worker = Worker()
        streams = [worker.submit(FakeTask(name, 5, [], runner=runner)) for name in "ab"]
        for stream in list(worker._pending):
            worker._start(stream)
        worker.step()
        worker.step()
        streams[0].cancel()
        while worker.active:
            worker.step()
        return runner.batches

    assert asyncio.run(main()) == [["a", "b"], ["a", "b"], ["b"], ["b"], ["b"]]


# -- over HTTP -------------------------------------------------------------------------------------------------------
def chat_reply(server, text: str, max_tokens: int) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "logit_bias": NO_STOP}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
        "content"]


def raw_reply(server, text: str, max_tokens: int) -> str:
    body = {"model": "tiny", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_STOP}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_concurrent_clients_are_batched_and_get_the_replies_they_get_alone(serve) -> None:
    server = serve(kv_budget="1MiB")
    jobs = [(chat_reply, "first client"), (chat_reply, "second, longer client message"),
            (chat_reply, "third"), (raw_reply, "a raw completion")]
    alone = [fn(server, text, 120) for fn, text in jobs]
    before = server.memory()["engine"]["decode"]["batch_sizes"]
    assert set(before) == {"1"}  # one client at a time: every forward decoded one sequence

    replies: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, fn=fn, text=text: replies.__setitem__(i, fn(server, text, 120)))
               for i, (fn, text) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [replies[i] for i in range(len(jobs))] == alone

    decode = server.memory()["engine"]["decode"]
    batched = {int(size): count - before.get(size, 0) for size, count in decode["batch_sizes"].items()}
    assert decode["max_batch_size"] >= 2 and sum(c for s, c in batched.items() if s >= 2) > 0
    assert decode["tokens"] == sum(int(s) * c for s, c in decode["batch_sizes"].items())
    metrics = httpx.get(server.url + "/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("kvbound_decode_batch_size_count"))
    single = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('kvbound_decode_batch_size_bucket{le="1.0"}'))
    assert count == decode["forwards"] and count - single > 0  # some forwards held more than one sequence
