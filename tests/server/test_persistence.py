"""With a SessionStore (`kvbound serve --data-dir`), a session named by a client outlives the server: a restarted
server lists it, and its next turn continues from the saved KV snapshot without feeding the history again."""

from __future__ import annotations

from pathlib import Path

import httpx

from kvbound.server.sessions import open_store
from tests.server.conftest import NO_STOP


def turn(server, text: str, session_id: str | None = None, max_tokens: int = 6) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "logit_bias": NO_STOP, **({"session_id": session_id} if session_id else {})}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_sessions_survive_a_restart(serve, tmp_path: Path) -> None:
    first = serve(store=open_store(tmp_path), kv_budget="256KiB")
    created = httpx.post(first.url + "/v1/sessions", json={"session_id": "kept", "system": "Be brief."})
    assert created.status_code == 201
    assert turn(first, "one", "kept").status_code == 200
    assert turn(first, "two", "kept").status_code == 200
    assert turn(first, "not named").status_code == 200  # found by history: not persisted
    before = httpx.get(first.url + "/v1/sessions/kept").json()

    second = serve(store=open_store(tmp_path), kv_budget="256KiB")
    listed = httpx.get(second.url + "/v1/sessions").json()["data"]
    assert listed == [{"id": "kept", "object": "session", "state": "stored"}]
    loaded = httpx.get(second.url + "/v1/sessions/kept").json()
    assert loaded["messages"] == before["messages"] and loaded["turns"] == 2 and loaded["state"] == "offloaded"

    again = turn(second, "three", "kept")
    assert again.status_code == 200, again.text
    assert again.headers["x-kvbound-session-state"] == "restored"
    extra = again.json()["kvbound"]
    assert extra["refed_history_tokens"] == 0 and extra["reused_tokens"] == before["kv_tokens"]  # the snapshot

    assert httpx.delete(second.url + "/v1/sessions/kept").status_code == 200
    third = serve(store=open_store(tmp_path), kv_budget="256KiB")
    assert httpx.get(third.url + "/v1/sessions").json()["data"] == []
    assert httpx.get(third.url + "/v1/sessions/kept").status_code == 404


def test_with_a_store_named_sessions_past_the_limit_move_to_disk(serve, tmp_path: Path) -> None:
    """With --data-dir, the least recently used idle named session leaves memory (not the store) to make room:
    more named sessions than --max-sessions all live, and the oldest continues where it was."""
    server = serve(store=open_store(tmp_path), kv_budget="256KiB", max_sessions=3)
    for i in range(6):
        assert httpx.post(server.url + "/v1/sessions", json={"session_id": f"s{i}"}).status_code == 201
        assert turn(server, f"hello {i}", f"s{i}").status_code == 200
    assert len(httpx.get(server.url + "/v1/sessions").json()["data"]) >= 6
    assert turn(server, "and again", "s0").status_code == 200
    assert httpx.get(server.url + "/v1/sessions/s0").json()["turns"] == 2
