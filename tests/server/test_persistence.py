"""With a SessionStore (`kvbound serve --data-dir`), a session named by a client outlives the server: a restarted
server lists it, and its next turn continues from the saved KV snapshot without feeding the history again; its
recall archive lives in the store too."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import httpx

from kvbound.chat import snapshot
from kvbound.server.sessions import STORE_FILE, open_store
from tests.server.conftest import NO_STOP, TINY_CONTEXT


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


def test_a_named_sessions_archive_lives_in_the_store(serve, tmp_path: Path) -> None:
    """A named session's evicted turns go into the store's archive table, not its snapshot: recalled after an
    offload to the spill and after a restart, counted on disk rather than in process, deleted with the session."""
    options = dict(kv_tokens=TINY_CONTEXT, policy="turns")  # a turn recalled takes 1/8 of it: ~90 tiny tokens
    first = serve(store=open_store(tmp_path), **options)
    assert httpx.post(first.url + "/v1/sessions", json={"session_id": "fact"}).status_code == 201
    assert turn(first, "my locker code is 4417", "fact").status_code == 200
    rng, db = random.Random(3), tmp_path / STORE_FILE
    for _ in range(80):
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(8, 20)))
        assert turn(first, filler, "fact").status_code == 200
        if 1 in archived(db, "fact"):
            break
    assert 1 in archived(db, "fact")
    memory = first.memory()
    [session] = [s["memory"] for s in memory["sessions"] if s["id"] == "fact"]
    assert session["archive_bytes"] == 0 and session["archive_stored_bytes"] > 0
    assert memory["store"]["archive_bytes"] == session["archive_stored_bytes"] and memory["store"]["file_bytes"] > 0
    with sqlite3.connect(db) as raw:
        assert snapshot.from_bytes(raw.execute("SELECT blob FROM snapshots").fetchone()[0])["archive"] == []

    assert httpx.post(first.url + "/v1/sessions", json={"session_id": "other"}).status_code == 201
    assert turn(first, "hello there, a long message to make room " * 6, "other").status_code == 200
    assert httpx.get(first.url + "/v1/sessions/fact").json()["state"] == "offloaded"  # its KV in the spill
    asked = turn(first, "what was my locker code", "fact")
    extra = asked.json()["kvbound"]
    assert asked.headers["x-kvbound-session-state"] == "restored" and extra["refed_history_tokens"] == 0
    assert 1 in extra["recall"]["turns"], extra["recall"]

    second = serve(store=open_store(tmp_path), **options)
    again = turn(second, "what was my locker code", "fact")
    assert again.status_code == 200 and 1 in again.json()["kvbound"]["recall"]["turns"]
    assert httpx.delete(second.url + "/v1/sessions/fact").status_code == 200
    assert archived(db, "fact") == set()


FILLER = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "walk", "garden", "bonnet", "carriage"]


def archived(db: Path, session_id: str) -> set[int]:
    """The turns the store's archive table holds for the session (committed)."""
    with sqlite3.connect(db) as raw:
        return {k for (k,) in raw.execute("SELECT key FROM archive WHERE session_id = ?", (session_id,))}
