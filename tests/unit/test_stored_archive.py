"""A session's recall archive kept in its SessionStore's file: its own rows of shared tables, searched and capped
like an archive in process; written with the turn that archived them; recalled from after the store is closed and
opened again; never inside the session's snapshot; moved there from a snapshot that still carries one; gone with
its session."""

from __future__ import annotations

import random
import sqlite3

import pytest
import torch

import kvbound
from kvbound.chat import snapshot
from kvbound.chat.persistence import SCHEMA_VERSION, SessionStore
from tests.helpers_tiny import save_hf_dir, tiny_hf_model

FILLER = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "walk", "garden", "bonnet", "carriage"]
CONFIG = {"tokens": 960, "policy": "turns"}
GREEDY = dict(max_new_tokens=4, temperature=0.0)
FACT, QUESTION = "my locker code is 4417", "what was my locker code"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    path = save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path_factory.mktemp("tiny"))
    return kvbound.load(path, dtype="fp32", device="cpu")


def stored_keys(db, session_id: str) -> set[int]:
    """The archive's keys as another connection sees them: what is committed."""
    with sqlite3.connect(db) as raw:
        return {k for (k,) in raw.execute("SELECT key FROM archive WHERE session_id = ?", (session_id,))}


def matches(db, word: str) -> int:
    with sqlite3.connect(db) as raw:
        return raw.execute("SELECT COUNT(*) FROM archive_index WHERE archive_index MATCH ?", (word,)).fetchone()[0]


def talk_until_turn_1_is_archived(chats: list, save) -> None:
    """The fact, then filler turns (the same to every chat), each saved, until turn 1 was evicted and archived."""
    rng = random.Random(1)
    text = FACT
    while True:
        for chat in chats:
            chat.send(text, **GREEDY)
        save()
        if 1 in chats[0].archive.keys():
            return
        assert chats[0].turn < 120
        text = " ".join(rng.choice(FILLER) for _ in range(rng.randint(8, 20)))


def test_stored_archives_search_their_own_rows_under_their_cap_and_go_with_their_session(tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    for sid in ("a", "b"):
        store.create(sid)
    a, b = store.archive("a", cap_bytes=1000), store.archive("b")
    a.add(1, "User: My locker code is 4417. Please remember it.\nAssistant: I will.")
    a.add(2, "User: Tell me about the weather in the hills.\nAssistant: Rainy.")
    b.add(1, "User: The gate code is 9981.\nAssistant: Noted.")
    assert stored_keys(db, "a") == set(), "writes wait for the store's next transaction of the session"
    assert a.search("What is my locker code?")[0].key == 1
    assert stored_keys(db, "a") == {1, 2}  # a read writes what waits first
    assert b.search("my locker") == [] and [p.key for p in b.search("the gate code")] == [1]  # a's rows are a's
    for turn in range(3, 103):
        a.add(turn, f"turn {turn} says " + "word " * 20)
    assert len(a) < 100 and a.nbytes <= 1000 and a.dropped > 0 and max(a.keys()) == 102 and min(a.keys()) > 3
    assert a.memory_bytes == 0 and a.stored_bytes == a.nbytes  # on disk, not in process
    assert a.search("locker code") == []  # the cap pushed the fact out
    report = store.report()
    assert report["archive_bytes"] == a.nbytes + b.nbytes and report["archive_entries"] == len(a) + len(b)
    assert {s["id"]: s["archive_bytes"] for s in store.list()} == {"a": a.nbytes, "b": b.nbytes}
    keys = a.keys()
    store.close()

    again = SessionStore(db)
    assert again.archive("a", cap_bytes=1000).keys() == keys and len(again.archive("b")) == 1
    assert again.delete("a")
    assert stored_keys(db, "a") == set() and matches(db, "word") == 0  # rows and index entries: gone with "a"
    assert [p.key for p in again.archive("b").search("the gate code")] == [1]
    with sqlite3.connect(db) as raw:
        raw.execute("INSERT INTO archive_index (archive_index) VALUES ('integrity-check')")  # raises if not
        assert raw.execute("SELECT COUNT(*) FROM archives").fetchone()[0] == 1


def test_a_store_session_recalls_an_evicted_turn_after_the_store_is_reopened(llm, tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    store.create("disk", "be brief", CONFIG)
    store.create("memory", "be brief", CONFIG)
    chat = llm.chat("be brief", archive=store.archive("disk"), **CONFIG)
    twin = llm.chat("be brief", **CONFIG)  # the same turns, its archive in process: its snapshot carries it
    blobs, committed = {}, [set()]

    def save():
        assert stored_keys(db, "disk") == committed[-1], "the turn's archived text waits for the turn's transaction"
        blobs["disk"] = store.save_turn("disk", chat)
        blobs["memory"] = store.save_turn("memory", twin)
        committed.append(stored_keys(db, "disk"))
        assert committed[-1] == twin.archive.keys(), "a turn's archived text is committed with the turn"

    talk_until_turn_1_is_archived([chat, twin], save)
    assert chat.archive.export() == twin.archive.export()  # the same entries, in the file and in process
    assert chat.memory().archive_bytes == 0 and chat.memory().archive_stored_bytes == chat.archive.nbytes > 0
    assert twin.memory().archive_stored_bytes == 0 and twin.memory().archive_bytes > 0
    with sqlite3.connect(db) as raw:
        blob = raw.execute("SELECT blob FROM snapshots WHERE session_id = 'disk'").fetchone()[0]
    assert snapshot.from_bytes(blob)["archive"] == []
    assert blobs["memory"] - blobs["disk"] >= twin.archive.nbytes  # the snapshot no longer carries the archive
    store.close()

    again = SessionStore(db)
    restored = again.load("disk", llm)
    assert restored.restored_from == "snapshot" and restored.archive.stored
    assert restored.archive.export() == twin.archive.export()
    reply, expected = restored.send(QUESTION, **GREEDY), twin.send(QUESTION, **GREEDY)
    assert 1 in reply.recall["turns"] and reply.recall == expected.recall, reply.recall
    assert reply.token_ids == expected.token_ids


def test_a_snapshot_that_carries_its_archive_moves_it_into_the_table_on_load(llm, tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    store.create("old", "be brief", CONFIG)
    chat = llm.chat("be brief", **CONFIG)  # in process: its snapshot carries the archive, as version 1 stores did
    talk_until_turn_1_is_archived([chat], lambda: store.save_turn("old", chat))
    store.close()
    with sqlite3.connect(db) as raw:  # the file as schema version 1 wrote it: no archive tables
        for statement in ("DROP TRIGGER archive_added", "DROP TRIGGER archive_deleted", "DROP TABLE archive_index",
                          "DROP TABLE archive", "DROP TABLE archives", "PRAGMA user_version = 1"):
            raw.execute(statement)
    assert len(chat.archive) > 1
    for _ in range(2):  # loaded twice before a turn is saved: the entries move once
        again = SessionStore(db)
        restored = again.load("old", llm)
        assert restored.archive.stored and restored.archive.export() == chat.archive.export()
        assert stored_keys(db, "old") == chat.archive.keys()
        with sqlite3.connect(db) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert raw.execute("SELECT COUNT(*) FROM archive").fetchone()[0] == len(chat.archive)
    reply, expected = restored.send(QUESTION, **GREEDY), chat.send(QUESTION, **GREEDY)
    assert 1 in reply.recall["turns"] and reply.token_ids == expected.token_ids
    blob_bytes = again.save_turn("old", restored)
    assert blob_bytes < len(snapshot.to_bytes(chat.export_state()))
    assert again.load("old", llm).archive.export() == restored.archive.export()


def test_a_chat_with_another_sessions_stored_archive_is_not_saved_here(llm, tmp_path):
    store = SessionStore(tmp_path / "s.db")
    store.create("x")
    store.create("y")
    chat = llm.chat(archive=store.archive("x"), **CONFIG)
    with pytest.raises(ValueError, match="another store or session"):
        store.save_turn("y", chat)
