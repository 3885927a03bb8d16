"""One KV budget for all sessions: a new session gets room by offloading the least recently used idle one (which
comes back on its next turn), a turn that can never fit is refused with 413 and its numbers, a turn that needs the
blocks of turns in progress with 429 — never a 500."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import NO_STOP

BLOCK_BYTES = 16384  # the tiny model's fp32 KV: 2 layers × 2 KV heads × 32 tokens × 16 dims × 4 bytes × K and V


def post(server, messages, session_id=None, max_tokens=8, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": NO_STOP, **fields}
    if session_id:
        body["session_id"] = session_id
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_lru_idle_session_is_offloaded_and_restored(serve) -> None:
    server = serve(kv_budget=6 * BLOCK_BYTES, spill_budget=0)  # 6 blocks, 192 tokens; restored by a prefill
    for name in ("s1", "s2", "s3"):  # each turn holds 2 blocks (~20 prompt + 16 reply tokens)
        assert post(server, user("hi"), name, max_tokens=16).status_code == 200
    pool = server.memory()["pool"]
    assert pool["blocks"] == 6 and pool["free_blocks"] == 0
    s1 = httpx.get(server.url + "/v1/sessions/s1").json()

    assert post(server, user("hi"), "s4", max_tokens=16).status_code == 200
    states = {s["id"]: s["state"] for s in httpx.get(server.url + "/v1/sessions").json()["data"]}
    assert states == {"s1": "offloaded", "s2": "idle", "s3": "idle", "s4": "idle"}  # s1 was used longest ago
    assert httpx.get(server.url + "/v1/sessions/s1").json()["offloads"] == 1

    again = post(server, user("more"), "s1", max_tokens=4)  # s1 comes back: its messages are fed again
    assert again.status_code == 200, again.text
    assert again.headers["x-kvbound-session-state"] == "restored"
    extra = again.json()["kvbound"]
    # The conversation is rendered again: its tokens, plus the end-of-turn marker the template closes the reply with
    # (this reply ran to max_tokens, so the model never wrote one).
    assert s1["kv_tokens"] <= extra["refed_history_tokens"] <= s1["kv_tokens"] + 3
    assert extra["reused_tokens"] == 0
    restored = httpx.get(server.url + "/v1/sessions/s1").json()
    assert restored["turns"] == 2 and restored["messages"][:2] == s1["messages"]
    metrics = httpx.get(server.url + "/metrics").text
    assert "kvbound_session_offloads_total 2.0" in metrics  # s1 for s4, then s2 for s1


def test_prompt_over_the_whole_budget_is_413(serve) -> None:
    server = serve(kv_budget=4 * BLOCK_BYTES)  # 128 tokens
    response = post(server, user("word " * 60))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]
    raw = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "word " * 60}, timeout=60)
    assert raw.status_code == 413 and "128" in raw.json()["error"]["message"]
    assert post(server, user("short")).status_code == 200  # and the server goes on


def test_reply_that_outgrows_a_full_conversation_is_413_then_usable(serve) -> None:
    server = serve(kv_budget=4 * BLOCK_BYTES)
    assert post(server, user("hi"), "long", max_tokens=80).status_code == 200  # ~100 of 128 tokens held
    refused = post(server, user("a longer message that cannot fit any more"), "long")
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/v1/sessions/long").json()["turns"] == 1


def hold_the_pool(server, holders: contextlib.ExitStack) -> None:
    """Two streamed 900-token replies: each reserves 29 of the pool's 64 blocks until it ends."""
    body = {"model": "tiny", "messages": user("go on"), "max_tokens": 900, "stream": True, "temperature": 0,
            "logit_bias": NO_STOP}
    for name in ("hold-1", "hold-2"):
        http = holders.enter_context(server.http())
        stream = holders.enter_context(http.stream("POST", "/v1/chat/completions", json={**body, "session_id": name}))
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped line iterator closes the response
        holders.callback(lines.close)
        next(lines)  # generating now


def test_a_busy_pool_queues_the_request_until_room_frees(serve) -> None:
    """No refusal storm: a turn that cannot get room waits in the queue and is answered once a turn ends."""
    server = serve(kv_budget="1MiB")
    answers: list[httpx.Response] = []
    with contextlib.ExitStack() as holders:  # leaving it closes the clients: their generations are cancelled
        hold_the_pool(server, holders)
        waiter = threading.Thread(target=lambda: answers.append(post(server, user("me too"), max_tokens=200)))
        waiter.start()
        deadline = time.monotonic() + 20
        while server.memory()["engine"]["queued"] != 1:  # waiting for room, not refused
            assert time.monotonic() < deadline and not answers, answers and answers[0].text
            time.sleep(0.02)
    waiter.join(60)
    assert answers[0].status_code == 200, answers[0].text


def test_busy_pool_is_429_with_retry_after(serve) -> None:
    server = serve(kv_budget="1MiB", queue_timeout_s=0.5)  # 64 blocks; a 900-token reply reserves 29 of 32
    with contextlib.ExitStack() as holders:  # leaving it closes the clients: their generations are cancelled
        hold_the_pool(server, holders)
        started = time.monotonic()
        refused = post(server, user("me too"), max_tokens=200)
        assert refused.status_code == 429, refused.text
        assert time.monotonic() - started >= 0.5  # it waited its queue timeout first
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "server_busy" and "blocks" in error["message"] and "waited" in error["message"]
        assert post(server, user("me too"), "hold-1").status_code == 429  # a session answering already
    deadline = time.monotonic() + 20
    while server.memory()["engine"]["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert post(server, user("me too"), max_tokens=200).status_code == 200


def test_full_queue_is_429(serve) -> None:
    server = serve(kv_budget="1MiB", max_active=1, max_queued=1)
    body = {"model": "tiny", "messages": user("go on"), "max_tokens": 900, "stream": True, "temperature": 0,
            "logit_bias": NO_STOP}
    waited: list[httpx.Response] = []
    with server.http() as running, running.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()  # kept: a dropped line iterator closes the response
        next(lines)
        waiter = threading.Thread(target=lambda: waited.append(post(server, user("second"), max_tokens=2)))
        waiter.start()
        deadline = time.monotonic() + 20
        while server.memory()["engine"]["queued"] != 1:  # the second waits behind the running reply
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = post(server, user("third"))
        assert refused.status_code == 429 and "queue" in refused.json()["error"]["message"]
        lines.close()
    waiter.join(30)
    assert waited[0].status_code == 200 and waited[0].json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("policy", ["window", "turns"])
def test_evicting_policy_keeps_a_long_session_going(serve, policy) -> None:
    server = serve(kv_budget=4 * BLOCK_BYTES, policy=policy)
    for turn in range(4):
        response = post(server, user(f"turn {turn}"), "evict", max_tokens=40)
        assert response.status_code == 200, response.text
    detail = httpx.get(server.url + "/v1/sessions/evict").json()
    assert detail["turns"] == 4 and detail["memory"]["tokens_evicted"] > 0
    assert detail["kv_tokens"] <= 128


def test_restore_that_would_overflow_with_the_new_message_keeps_the_newest_turns(serve, tiny_llm) -> None:
    """An offloaded conversation that fits the capacity alone, but not with the next message, is restored with its
    newest turns only (as Chat.from_messages cuts) instead of being refused with 413 (seen in the load benchmark)."""
    server = serve(kv_budget=6 * BLOCK_BYTES, policy="turns", spill_budget=0)  # 192 tokens per session at most
    render, encode = tiny_llm.tokenizer.apply_chat_template, tiny_llm.tokenizer.encode
    for turn in range(2):
        assert post(server, user(f"turn {turn}"), "long", max_tokens=24).status_code == 200
    messages = httpx.get(server.url + "/v1/sessions/long").json()["messages"]
    history = len(encode(render(messages, add_generation_prompt=False)))
    assert history < 192
    for name in ("a", "b"):  # two more sessions: "long", used longest ago, is offloaded
        assert post(server, user("hi " * 20), name, max_tokens=30).status_code == 200
    assert httpx.get(server.url + "/v1/sessions/long").json()["state"] == "offloaded"
    words = 1
    while len(encode(render(messages + user("x " * words), add_generation_prompt=True))) - history < 192 - history:
        words += 1  # the shortest message that overflows together with the history
    response = post(server, messages + user("x " * words), "long", max_tokens=4)
    assert response.status_code == 200, response.text
    assert response.headers["x-kvbound-session-state"] == "restored"
    assert response.json()["kvbound"]["refed_history_tokens"] < history


def test_raw_completion_takes_its_blocks_from_the_shared_pool(serve) -> None:
    """/v1/completions is admitted like a chat turn: an idle session is offloaded to make room, and the blocks
    return to the pool when it ends."""
    server = serve(kv_budget=6 * BLOCK_BYTES)  # 6 blocks, 192 tokens
    assert post(server, user("hi"), "idle", max_tokens=40).status_code == 200  # holds 2+ blocks
    held = server.memory()["pool"]["free_blocks"]
    assert held <= 4
    body = {"model": "tiny", "prompt": "word " * 8, "max_tokens": 100, "temperature": 0, "logit_bias": NO_STOP}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 100
    assert httpx.get(server.url + "/v1/sessions/idle").json()["state"] == "offloaded"
    assert server.memory()["pool"]["free_blocks"] == 6


def test_offloaded_session_comes_back_from_the_spill_without_a_prefill(serve, tiny_llm) -> None:
    """With the spill on (the default), an offloaded session's KV goes to disk and its next turn reads it back:
    nothing of its history is fed again, and the reply is the one the session would have given had it never left
    the pool (greedy, same KV bytes)."""
    spilled = serve(kv_budget=6 * BLOCK_BYTES)
    kept = serve(kv_budget=64 * BLOCK_BYTES)  # room for everyone: nothing is offloaded
    for server in (spilled, kept):
        for name in ("s1", "s2", "s3", "s4"):  # s4 makes room by offloading s1
            assert post(server, user(f"hi {name}"), name, max_tokens=16).status_code == 200
    assert httpx.get(spilled.url + "/v1/sessions/s1").json()["state"] == "offloaded"
    spill = spilled.memory()["engine"]["spill"]
    assert spill["sessions"] == 1 and spill["bytes"] > 0 and spill["written"] == 1
    assert len(list(Path(spill["directory"]).glob("*.kvs"))) == 1

    again = post(spilled, user("more"), "s1", max_tokens=6)
    assert again.status_code == 200, again.text
    assert again.headers["x-kvbound-session-state"] == "restored"
    assert again.json()["kvbound"]["refed_history_tokens"] == 0
    reference = post(kept, user("more"), "s1", max_tokens=6)
    assert again.json()["choices"][0]["message"]["content"] == reference.json()["choices"][0]["message"]["content"]
    spill = spilled.memory()["engine"]["spill"]
    assert spill["restored"] == 1 and spill["sessions"] >= 1  # s1 came back; others went out for it
    assert not (Path(spill["directory"]) / "s1.kvs").exists()
    assert "kvbound_spill_restores_total 1.0" in httpx.get(spilled.url + "/metrics").text


def test_spill_over_its_budget_drops_the_oldest_and_that_session_is_rebuilt(serve) -> None:
    """A spill too small for two sessions keeps the newest; the one it dropped comes back by a prefill of its
    messages. A deleted session's file goes too."""
    sizing = serve(kv_budget=6 * BLOCK_BYTES)
    for name in ("s1", "s2", "s3", "s4"):  # s4 offloads s1
        assert post(sizing, user(f"hi {name}"), name, max_tokens=16).status_code == 200
    one = sizing.memory()["engine"]["spill"]["bytes"]
    server = serve(kv_budget=6 * BLOCK_BYTES, spill_budget=one * 3 // 2)  # room for one spilled session
    for name in ("s1", "s2", "s3", "s4", "s5"):  # s4 offloads s1, s5 offloads s2
        assert post(server, user(f"hi {name}"), name, max_tokens=16).status_code == 200
    spill = server.memory()["engine"]["spill"]
    assert spill["sessions"] == 1 and spill["dropped"] == 1 and spill["bytes"] <= one * 3 // 2
    first = post(server, user("more"), "s1", max_tokens=4)  # dropped from the spill: fed again
    assert first.status_code == 200 and first.json()["kvbound"]["refed_history_tokens"] > 0
    spill = server.memory()["engine"]["spill"]
    [spilled] = Path(spill["directory"]).glob("*.kvs")  # the session offloaded to make room for s1
    assert httpx.delete(server.url + f"/v1/sessions/{spilled.stem}").status_code == 200
    assert server.memory()["engine"]["spill"]["sessions"] == 0 and not spilled.exists()


def test_spill_that_cannot_be_read_falls_back_to_the_messages(serve) -> None:
    server = serve(kv_budget=6 * BLOCK_BYTES)
    for name in ("s1", "s2", "s3", "s4"):
        assert post(server, user(f"hi {name}"), name, max_tokens=16).status_code == 200
    directory = Path(server.memory()["engine"]["spill"]["directory"])
    (directory / "s1.kvs").write_bytes(b"not a snapshot")
    again = post(server, user("more"), "s1", max_tokens=4)
    assert again.status_code == 200, again.text
    assert again.json()["kvbound"]["refed_history_tokens"] > 0  # rebuilt from its messages


def test_bad_spill_budget_is_a_clear_error() -> None:
    from kvbound.server.settings import ServerSettings

    with pytest.raises(ValueError, match="--spill-budget"):
        ServerSettings(spill_budget="lots")
    assert ServerSettings(spill_budget="0").spill_bytes() == 0


def test_spilled_session_near_its_capacity_is_restored_and_evicts_instead_of_413(serve) -> None:
    """A spilled session that holds nearly a whole session's capacity comes back and makes room by its policy,
    like a session that never left the pool (the load benchmark once got 413s here: the spilled KV was counted
    as tokens to feed)."""
    server = serve(kv_budget=6 * BLOCK_BYTES, policy="turns")  # a session holds at most 192 tokens
    for turn in range(4):
        assert post(server, user(f"turn {turn} " + "word " * 12), "big", max_tokens=24).status_code == 200
    assert httpx.get(server.url + "/v1/sessions/big").json()["kv_tokens"] > 150
    for name in ("a", "b"):
        assert post(server, user("hi " * 20), name, max_tokens=30).status_code == 200
    assert httpx.get(server.url + "/v1/sessions/big").json()["state"] == "offloaded"
    again = post(server, user("and now? " + "word " * 12), "big", max_tokens=24)
    assert again.status_code == 200, again.text
    assert again.headers["x-kvbound-session-state"] == "restored"
    assert again.json()["kvbound"]["refed_history_tokens"] == 0
    assert again.json()["kvbound"]["evicted_tokens"] > 0
