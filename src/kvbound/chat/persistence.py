"""Chat sessions on disk (SQLite): each session's settings, its messages, its newest state snapshot and its recall
archive (the text of evicted turns: chat/archive.py's tables, its own rows per session), written in one transaction
per answered turn so a restart or `kill -9` loses at most the turn under way. Owns the schema and its migrations;
what a snapshot holds is chat/snapshot.py's business, the archive's SQL chat/archive.py's.

Durability: WAL journal with synchronous=NORMAL (the default). A transaction that returned from COMMIT is in the
WAL file, i.e. handed to the OS, so it survives the death of the process however it dies; a power cut or kernel
crash can lose the newest few commits (never corrupt the file) until the next WAL checkpoint fsyncs them.
`synchronous="FULL"` fsyncs the WAL at every commit: power-loss safe at the cost of one fsync per turn
(milliseconds, small beside a turn's generation).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbound.chat import snapshot
from kvbound.chat.archive import DEFAULT_CAP_BYTES
from kvbound.chat.archive import SCHEMA as ARCHIVE_SCHEMA
from kvbound.chat.session import Chat
from kvbound.chat.stored_archive import StoredArchive
from kvbound.config import CacheConfig
from kvbound.errors import KvboundError, SessionNotFoundError
from kvbound.errors import SnapshotError

if TYPE_CHECKING:
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM

logger = logging.getLogger("kvbound.chat")
SCHEMA_VERSION = 2  # PRAGMA user_version of a store this code writes; 1: without the archive's tables
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCHEMA = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system TEXT,
    config TEXT NOT NULL  -- JSON: the CacheConfig options the session's chat is made with
);
CREATE TABLE messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE snapshots (
    session_id TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    format_version INTEGER NOT NULL,
    blob BLOB NOT NULL  -- chat/snapshot.py's bytes of Chat.export_state()
);
"""


class SessionStore:
    """Sessions in one SQLite file. One connection, serialized by a lock: safe to share between threads."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL"):
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self._lock = threading.Lock()
        # Autocommit mode: every write below opens its own explicit transaction.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            # One statement at a time: executescript would commit half-way.
            if version == 0:  # a new file
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            if version in (0, 1):  # version 1 kept archives inside the snapshots: `load` moves each one here
                for statement in ARCHIVE_SCHEMA:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise KvboundError(f"the session store {self.path} has schema version {version} and this kvbound "
                                   f"reads version {SCHEMA_VERSION}; open it with the kvbound that wrote it")

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    # -- writing ----------------------------------------------------------------------------------------------------
    def create(self, session_id: str, system: str | None = None, config: dict[str, Any] | None = None) -> None:
        """Register a new session: its system prompt and the CacheConfig options (budget, dtype, policy, ...) its
        chat is made with (`llm.chat(system, **config)`); `load` rebuilds with the same."""
        _check_id(session_id)
        config = dict(config or {})
        CacheConfig(**config)  # refuse bad options now, not at the first restore
        now = time.time()
        with self._transaction():
            try:
                self._db.execute("INSERT INTO sessions (id, created, updated, system, config) VALUES (?, ?, ?, ?, ?)",
                                 (session_id, now, now, system, json.dumps(config)))
                if system:
                    self._db.execute("INSERT INTO messages VALUES (?, 0, 'system', ?)", (session_id, system))
            except sqlite3.IntegrityError:
                raise ValueError(f"session '{session_id}' already exists; load it, or delete it first") from None

    def save_turn(self, session_id: str, chat: Chat) -> int:
        """Store `chat`'s messages and state snapshot in one transaction (after each answered turn); returns the
        snapshot's size in bytes. Only messages that changed are written. A chat whose archive is the session's
        here (`archive`; a chat `load` made has it) writes what its archive gained or lost in the same transaction,
        and its snapshot carries no archive; a chat with an archive in process carries it in the snapshot."""
        _check_id(session_id)
        archive = chat.archive
        own = archive is not None and archive.kept_in(self._db, session_id)
        if archive is not None and archive.stored and not own:
            raise ValueError(f"the chat's archive is kept in another store or session than '{session_id}' here; "
                             "save it there, or load the session from this store")
        blob = snapshot.to_bytes(chat.export_state())  # serialized outside the lock: other sessions keep going
        messages = [(m["role"], m["content"]) for m in chat.messages]
        with self._transaction():
            self._require(session_id)
            stored = self._db.execute("SELECT role, content FROM messages WHERE session_id = ? ORDER BY idx",
                                      (session_id,)).fetchall()
            same = 0
            while same < min(len(stored), len(messages)) and tuple(stored[same]) == messages[same]:
                same += 1
            self._db.execute("DELETE FROM messages WHERE session_id = ? AND idx >= ?", (session_id, same))
            self._db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)",
                                 [(session_id, i, role, content) for i, (role, content) in
                                  enumerate(messages[same:], start=same)])
            self._db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?)",
                             (session_id, snapshot.SESSION_FORMAT, blob))
            self._db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (time.time(), session_id))
            written = archive.write_pending() if own else 0
        if written:
            archive.forget_written(written)
        return len(blob)

    def archive(self, session_id: str, cap_bytes: int = DEFAULT_CAP_BYTES) -> StoredArchive:
        """The session's recall archive in this file (empty at first), for its chat (`llm.chat(archive=...)`); a
        chat `load` makes has it."""
        _check_id(session_id)
        with self._transaction():
            self._require(session_id)
            self._db.execute("INSERT OR IGNORE INTO archives (session_id) VALUES (?)", (session_id,))
            (number,) = self._db.execute("SELECT number FROM archives WHERE session_id = ?", (session_id,)).fetchone()
        return StoredArchive(self._db, self._lock, self._transaction, session_id, number, cap_bytes)

    def delete(self, session_id: str) -> bool:
        """Forget a session (messages, snapshot and archive too); False if there was none."""
        _check_id(session_id)
        with self._transaction():
            return self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    # -- reading ----------------------------------------------------------------------------------------------------
    def load(self, session_id: str, llm: "LLM", pool: "BlockPool | None" = None, **cache_options: Any) -> Chat:
        """The session's chat, continuing exactly where its last saved turn left it (from the snapshot). Options
        override the stored CacheConfig ones; if the snapshot is missing, unreadable, of another model or of
        another KV layout/policy than these options give, the chat is rebuilt from its messages instead
        (Chat.from_messages: one prefill of at most the cache's capacity; replies are not regenerated).
        `chat.restored_from` says which. The messages are never lost. The chat recalls from the session's archive
        here; a snapshot that still carries its archive (a store of schema version 1) moves it here now."""
        _check_id(session_id)
        with self._lock:
            self._require(session_id)
            config = self._db.execute("SELECT config FROM sessions WHERE id = ?", (session_id,)).fetchone()[0]
            messages = self._messages(session_id)
            snap = self._db.execute("SELECT format_version, blob FROM snapshots WHERE session_id = ?",
                                    (session_id,)).fetchone()
        stored = self.archive(session_id)
        cache = llm.new_cache(CacheConfig(**{**json.loads(config), **cache_options}), pool=pool)
        reason = "no snapshot was saved"
        if snap is not None:
            try:
                if snap[0] != snapshot.SESSION_FORMAT:
                    raise SnapshotError(f"snapshot format {snap[0]}, this kvbound reads {snapshot.SESSION_FORMAT}")
                state = snapshot.from_bytes(snap[1])
                snapshot.check_messages(state, messages, "the stored ones")
                return self._keep_archive(session_id, Chat.from_state(llm, state, cache=cache, archive=stored))
            except SnapshotError as e:
                reason = str(e)
                cache.free()
        logger.warning("session '%s': rebuilding its KV cache from %d messages (%s)", session_id, len(messages),
                       reason)
        try:
            return self._keep_archive(session_id, Chat.from_messages(llm, messages, cache, archive=stored))
        except BaseException:
            cache.free()  # the rebuild failed: give its blocks back to the (possibly shared) pool
            raise

    def get_messages(self, session_id: str) -> list[dict[str, str]]:
        _check_id(session_id)
        with self._lock:
            self._require(session_id)
            return self._messages(session_id)

    def list(self) -> list[dict[str, Any]]:
        """Every session's metadata, newest update first: id, created, updated, system, config, messages,
        snapshot_bytes (0 if none), archive_bytes (its archive's text)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.id, s.created, s.updated, s.system, s.config,"
                " (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id),"
                " (SELECT COALESCE(LENGTH(blob), 0) FROM snapshots p WHERE p.session_id = s.id),"
                " (SELECT bytes FROM archives a WHERE a.session_id = s.id)"
                " FROM sessions s ORDER BY s.updated DESC").fetchall()
        return [{"id": r[0], "created": r[1], "updated": r[2], "system": r[3], "config": json.loads(r[4]),
                 "messages": r[5], "snapshot_bytes": r[6] or 0, "archive_bytes": r[7] or 0} for r in rows]

    def report(self) -> dict[str, Any]:
        """What the store holds on disk: path, file_bytes (the database and its WAL), sessions, and the archives'
        archive_entries and archive_bytes (their text; the index adds about as much again)."""
        with self._lock:
            sessions = self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            entries, text = self._db.execute("SELECT COALESCE(SUM(entries), 0), COALESCE(SUM(bytes), 0) "
                                             "FROM archives").fetchone()
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return {"path": str(self.path), "file_bytes": sum(f.stat().st_size for f in files if f.exists()),
                "sessions": sessions, "archive_entries": entries, "archive_bytes": text}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _keep_archive(self, session_id: str, chat: Chat) -> Chat:
        """`chat` (loaded) with its archive here: entries its snapshot carried move into the table now."""
        if chat.archive is not None:
            if not chat.archive.kept_in(self._db, session_id):
                chat.keep_archive_in(self.archive(session_id, chat.archive.cap_bytes))
            chat.archive.flush()
        return chat

    def _messages(self, session_id: str) -> list[dict[str, str]]:
        rows = self._db.execute("SELECT role, content FROM messages WHERE session_id = ? ORDER BY idx",
                                (session_id,)).fetchall()
        return [{"role": role, "content": content} for role, content in rows]

    def _require(self, session_id: str) -> None:
        if self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
            raise SessionNotFoundError(f"no session '{session_id}' in {self.path}; create it first")


class _Transaction:
    """`with`: hold the store's lock, BEGIN IMMEDIATE (take the write lock up front), COMMIT or ROLLBACK."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, kind: type | None, *exc: object) -> None:
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()


def _check_id(session_id: str) -> None:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise ValueError(f"session id {session_id!r} is not 1-64 letters, digits, '_' or '-'")
