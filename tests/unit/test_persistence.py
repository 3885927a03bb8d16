"""SessionStore on SQLite with a tiny random model: sessions written by one store come back in a fresh one and go on
exactly as the original chat would; a process killed with SIGKILL in the middle of a turn (or at a random moment)
loses no answered turn; a missing, damaged or incompatible snapshot falls back to the messages."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.chat.persistence import SCHEMA_VERSION, SessionNotFoundError, SessionStore
from tests.helpers_tiny import save_hf_dir, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "Mr", "Darcy", "1", "22", "code", "is", "2128"]
GREEDY = dict(max_new_tokens=10, temperature=0.0)
CONFIG = {"tokens": 512, "dtype": "int8", "policy": "turns+h2o"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    torch.set_num_threads(1)
    return kvbound.load(model_dir, dtype="fp32", device="cpu")


def messages(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(count)]


def test_store_round_trip_in_a_fresh_store(llm, tmp_path):
    db = tmp_path / "sessions.db"
    store = SessionStore(db)
    chats = {}
    for sid, config in [("alice", CONFIG), ("bob_2", {"tokens": 256, "dtype": "int4", "policy": "window"}),
                        ("c-3", {"budget": 1024 * 1024})]:
        store.create(sid, f"you talk to {sid}", config)
        chats[sid] = llm.chat(f"you talk to {sid}", **config)
        for text in messages(6, seed=len(sid)):
            chats[sid].send(text, **GREEDY)
            assert store.save_turn(sid, chats[sid]) > 0
    assert chats["bob_2"].cache.evicted_total > 0
    listed = {s["id"]: s for s in store.list()}
    assert set(listed) == set(chats) and listed["alice"]["messages"] == 13 and listed["alice"]["config"] == CONFIG
    assert all(s["snapshot_bytes"] > 0 for s in listed.values())
    store.close()

    again = SessionStore(db)
    for sid, chat in chats.items():
        assert again.get_messages(sid) == chat.messages
        restored = again.load(sid, llm)
        assert restored.restored_from == "snapshot"
        for text in messages(4, seed=99):
            got, want = restored.send(text, **GREEDY), chat.send(text, **GREEDY)
            assert got.token_ids == want.token_ids and got.context_tokens == want.context_tokens
            again.save_turn(sid, restored)
        assert again.get_messages(sid) == chat.messages
    assert again.delete("alice") and not again.delete("alice")
    with pytest.raises(SessionNotFoundError):
        again.load("alice", llm)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT COUNT(*) FROM messages WHERE session_id = 'alice'").fetchone()[0] == 0
    again.close()


def test_ids_configs_and_versions_are_checked(llm, tmp_path):
    store = SessionStore(tmp_path / "s.db")
    for bad in ("", "a b", "x" * 65, "../etc", "é", None):
        with pytest.raises(ValueError):
            store.create(bad)
    with pytest.raises(ValueError, match="evict_fraction"):
        store.create("ok", config={"evict_fraction": 2.0})
    store.create("ok")
    with pytest.raises(ValueError, match="already exists"):
        store.create("ok")
    with pytest.raises(SessionNotFoundError):
        store.save_turn("nope", llm.chat())
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(kvbound.KvboundError, match="schema version 99"):
        SessionStore(tmp_path / "s.db")


def test_reset_conversation_rewrites_messages(llm, tmp_path):
    store = SessionStore(tmp_path / "s.db")
    store.create("r", "be brief", {"tokens": 512})
    chat = llm.chat("be brief", tokens=512)
    for text in messages(3, seed=1):
        chat.send(text, **GREEDY)
    store.save_turn("r", chat)
    chat.reset()
    chat.send("tea", **GREEDY)
    store.save_turn("r", chat)
    assert store.get_messages("r") == chat.messages and len(chat.messages) == 3


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other_dtype"])
def test_bad_snapshot_falls_back_to_messages(llm, tmp_path, damage, caplog):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    store.create("s", "be brief", {"tokens": 512})
    chat = llm.chat("be brief", tokens=512)
    for text in messages(4, seed=2):
        chat.send(text, **GREEDY)
    store.save_turn("s", chat)
    options = {}
    with sqlite3.connect(db) as raw:
        if damage == "missing":
            raw.execute("DELETE FROM snapshots")
        elif damage == "corrupt":
            raw.execute("UPDATE snapshots SET blob = substr(blob, 1, length(blob) / 2)")
    if damage == "other_dtype":
        options = {"dtype": "int4"}  # the server now stores KV differently: the snapshot's layout no longer fits
    restored = store.load("s", llm, **options)
    assert restored.restored_from == "messages" and restored.messages == chat.messages
    assert "rebuilding its KV cache" in caplog.text
    assert restored.cache.spec.dtype == options.get("dtype", "fp32")
    reply = restored.send("tea in the hills", **GREEDY)
    # Only the new message is prefilled (the original feeds the same, plus the newline after the last reply).
    assert reply.prompt_tokens <= chat.send("tea in the hills", **GREEDY).prompt_tokens
    store.save_turn("s", restored)
    assert SessionStore(db).load("s", llm, **options).restored_from == "snapshot"


def test_threads_share_a_store(llm, tmp_path):
    store = SessionStore(tmp_path / "s.db")
    chats = {f"t{i}": llm.chat("be brief", tokens=256) for i in range(3)}
    for sid, chat in chats.items():
        store.create(sid, "be brief", {"tokens": 256})
        chat.send("tea", **GREEDY)
    errors = []

    def save(sid):
        try:
            for _ in range(20):
                store.save_turn(sid, chats[sid])
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(sid,)) for sid in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(store.get_messages(sid) == chats[sid].messages for sid in chats)


CHILD = textwrap.dedent("""
    import sys, torch, kvbound
    from kvbound.chat.persistence import SessionStore
    torch.set_num_threads(1)
    model_dir, db, texts, long_turn = sys.argv[1], sys.argv[2], sys.argv[3].split("|"), int(sys.argv[4])
    llm = kvbound.load(model_dir, dtype="fp32", device="cpu")
    store = SessionStore(db)
    store.create("victim", "be brief", {config!r})
    chat = llm.chat("be brief", archive=store.archive("victim"), **{config!r})  # as a server's named session
    for turn, text in enumerate(texts, start=1):
        max_new = 3000 if turn == long_turn else 10  # a long turn: seconds of decoding to be killed in
        for i, piece in enumerate(chat.stream(text, max_new_tokens=max_new, temperature=0.0)):
            if i == 0:
                print(f"streaming {{turn}}", flush=True)
        store.save_turn("victim", chat)
        print(f"saved {{turn}}", flush=True)
""")


def run_and_kill(model_dir: Path, db: Path, texts: list[str], kill_on: str, delay_s: float = 0.0,
                 long_turn: int = 0) -> list[str]:
    """Run the child until it prints `kill_on`, wait `delay_s`, SIGKILL it; return the lines it printed."""
    script = CHILD.format(config=CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, str(model_dir), str(db), "|".join(texts), str(long_turn)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if lines[-1] == kill_on:
                time.sleep(delay_s)
                os.kill(child.pid, signal.SIGKILL)
                break
        assert child.wait(timeout=60) == -signal.SIGKILL, f"the child ended on its own: {lines}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return lines


def reference(llm, texts: list[str]):
    chat = llm.chat("be brief", **CONFIG)
    for text in texts:
        chat.send(text, **GREEDY)
    return chat


def test_kill_9_mid_turn_keeps_every_answered_turn(llm, model_dir, tmp_path):
    texts = messages(5, seed=5)
    db = tmp_path / "s.db"
    # Killed while turn 4 is streaming its reply: turns 1-3 were answered and saved.
    lines = run_and_kill(model_dir, db, texts, kill_on="streaming 4", long_turn=4)
    assert lines[-2:] == ["saved 3", "streaming 4"]
    store = SessionStore(db)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    original = reference(llm, texts[:3])
    assert store.get_messages("victim") == original.messages
    restored = store.load("victim", llm)
    assert restored.restored_from == "snapshot"
    for text in texts[3:]:
        assert restored.send(text, **GREEDY).token_ids == original.send(text, **GREEDY).token_ids


def test_kill_9_at_a_random_moment_loses_no_saved_turn(llm, model_dir, tmp_path):
    texts = messages(40, seed=6)
    db = tmp_path / "s.db"
    lines = run_and_kill(model_dir, db, texts, kill_on="saved 2", delay_s=random.Random().uniform(0.0, 0.3))
    saved = max(int(line.split()[1]) for line in lines if line.startswith("saved"))
    store = SessionStore(db)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = store.get_messages("victim")
    turns = (len(stored) - 1) // 2
    assert turns >= saved and len(stored) == 1 + 2 * turns  # whole turns only: a turn is one transaction
    original = reference(llm, texts[:turns])
    assert stored == original.messages
    restored = store.load("victim", llm)
    assert restored.restored_from == "snapshot"
    assert restored.archive.export() == original.archive.export()  # its rows were saved with their turns
    text = texts[turns]
    assert restored.send(text, **GREEDY).token_ids == original.send(text, **GREEDY).token_ids


def test_kill_9_mid_turn_keeps_the_archive_of_every_answered_turn(llm, model_dir, tmp_path):
    texts = messages(25, seed=7)
    db = tmp_path / "s.db"
    lines = run_and_kill(model_dir, db, texts, kill_on="streaming 25", long_turn=25)
    assert lines[-2:] == ["saved 24", "streaming 25"]
    original = reference(llm, texts[:24])
    restored = SessionStore(db).load("victim", llm)
    assert original.archive.keys() and restored.archive.export() == original.archive.export()
