"""The text of what a session's cache evicted, kept outside the KV and searchable: SQLite's built-in FTS5 index
(BM25 ranking) under a byte cap; the oldest entries go first when the cap is reached. An Archive is one session's
rows of the tables SCHEMA makes: in an in-memory database of its own (a chat without a store, a raw prompt), or in
a SessionStore's file (chat/stored_archive.py), where every session's rows share the tables. Owns no KV and no
model state."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

DEFAULT_CAP_BYTES = 1 << 20  # 1 MiB of text: ~1,000 turns of 150 words (benchmarks/archive.py measures the pages)
QUERY_WORDS = 12  # a message is searched by its rarest distinctive words: long messages cost no more than short
OPTIMIZE_EVERY = 500  # entries dropped between merges of the index (deleted rows keep pages until then)
# A session's entries have the rowids number << RANGE_BITS and up (`archives.number`): FTS5 seeks a MATCH to a rowid
# range, so one session's search reads its own postings, not every session's in a store.
RANGE_BITS = 32
# Words that carry no fact: a question's "what is my" must not pull in every turn that says "my".
STOPWORDS = frozenset("""a an and are as at be but by can could did do does for from had has have he her his how i
if in is it its me my of on or our please she so that the their them then there these they this to too was we were
what when where which who why will with would you your""".split())

# The entries and their counts live in plain tables (a session's are deleted with it: ON DELETE CASCADE, where
# `sessions` exists and foreign keys are on); the FTS5 index reads its text from `archive` (external content) and
# triggers keep it, and the counts, in step with every insert and delete, cascades included.
SCHEMA = (
    """CREATE TABLE archives (
        number INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a rowid range stays one session's
        session_id TEXT NOT NULL UNIQUE REFERENCES sessions(id) ON DELETE CASCADE,
        entries INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,  -- UTF-8 bytes of its entries' text
        dropped INTEGER NOT NULL DEFAULT 0  -- entries the cap pushed out
    )""",
    """CREATE TABLE archive (
        id INTEGER PRIMARY KEY,  -- in its session's range (RANGE_BITS); a higher id is a newer entry
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        key INTEGER NOT NULL,  -- the turn (chat) or passage number (raw prompt) it came from
        text TEXT NOT NULL,
        UNIQUE (session_id, key)
    )""",
    "CREATE VIRTUAL TABLE archive_index USING fts5(key UNINDEXED, text, content='archive', content_rowid='id', "
    "tokenize='unicode61')",
    """CREATE TRIGGER archive_added AFTER INSERT ON archive BEGIN
        INSERT INTO archive_index (rowid, key, text) VALUES (new.id, new.key, new.text);
        UPDATE archives SET entries = entries + 1, bytes = bytes + length(CAST(new.text AS BLOB))
            WHERE session_id = new.session_id;
    END""",
    """CREATE TRIGGER archive_deleted AFTER DELETE ON archive BEGIN
        INSERT INTO archive_index (archive_index, rowid, key, text) VALUES ('delete', old.id, old.key, old.text);
        UPDATE archives SET entries = entries - 1, bytes = bytes - length(CAST(old.text AS BLOB))
            WHERE session_id = old.session_id;
    END""",
)


@dataclass(frozen=True)
class Passage:
    key: int  # the turn (chat) or passage number (raw prompt) it came from
    text: str
    score: float  # BM25, higher is better


class Archive:
    """One session's archive. Without `db`, an in-memory database of its own, for one thread at a time (its
    chat's); with `db` (a SessionStore's connection, see chat/stored_archive.py), the rows of `session_id`, whose
    `archives` row has `number`."""

    stored = False  # whether its entries live in a store (a snapshot of its chat then carries none)
    optimizes = True  # merge the index every OPTIMIZE_EVERY dropped entries, handing deleted rows' pages back

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES, db: sqlite3.Connection | None = None,
                 session_id: str = "", number: int = 0):
        if cap_bytes < 1:
            raise ValueError(f"the archive's byte cap must be positive, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        if db is None:
            db = sqlite3.connect(":memory:", check_same_thread=False)
            for statement in SCHEMA:
                db.execute(statement)
            number = db.execute("INSERT INTO archives (session_id) VALUES (?)", (session_id,)).lastrowid
        self._db, self._session_id, self._number = db, session_id, number
        self._first = number << RANGE_BITS
        self._last = self._first + (1 << RANGE_BITS) - 1

    def _access(self) -> ContextManager[Any]:
        """Held around each use of the database: an archive of its own needs nothing."""
        return contextlib.nullcontext()

    # -- what it holds -----------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of archived text (UTF-8); the index adds about as much again."""
        with self._access():
            return self._counts()[1]

    def __len__(self) -> int:
        with self._access():
            return self._counts()[0]

    @property
    def dropped(self) -> int:
        """Entries the cap pushed out."""
        with self._access():
            return self._counts()[2]

    def keys(self) -> set[int]:
        with self._access():
            return {k for (k,) in self._db.execute("SELECT key FROM archive WHERE id BETWEEN ? AND ?",
                                                   (self._first, self._last))}

    def kept_in(self, db: sqlite3.Connection, session_id: str) -> bool:
        """Whether this is the archive of `session_id` in the database `db` (a store's connection)."""
        return self._db is db and self._session_id == session_id

    @property
    def memory_bytes(self) -> int:
        """What the database holds in memory: its pages (the text, the index, and free pages it reuses)."""
        with self._access():
            count = self._db.execute("PRAGMA page_count").fetchone()[0]
            return count * self._db.execute("PRAGMA page_size").fetchone()[0]

    @property
    def stored_bytes(self) -> int:
        """Bytes of text it keeps on disk (in a store's file), not in this process: none."""
        return 0

    # -- writing -----------------------------------------------------------------------------------------------------
    def add(self, key: int, text: str) -> None:
        """Archive `text` under `key` (replacing what the key held); the oldest entries leave past the cap. Each
        step is a lookup by key or rowid: the cost does not grow with the archive."""
        with self._access():
            self._add(key, text)

    def remove(self, key: int) -> None:
        with self._access():
            self._remove(key)

    def clear(self) -> None:
        with self._access():
            self._clear()

    def restore(self, entries: list[list]) -> None:
        """Add `export()`'s entries, oldest first."""
        with self._access():
            for key, text in entries:
                self._add(int(key), text)

    def _add(self, key: int, text: str) -> None:
        self._remove(key)
        data = text.encode("utf-8")[: self.cap_bytes].decode("utf-8", "ignore")
        (rowid,) = self._db.execute("SELECT COALESCE(MAX(id) + 1, ?) FROM archive WHERE id BETWEEN ? AND ?",
                                    (self._first, self._first, self._last)).fetchone()
        self._db.execute("INSERT INTO archive (id, session_id, key, text) VALUES (?, ?, ?, ?)",
                         (rowid, self._session_id, key, data))
        while self._counts()[1] > self.cap_bytes:
            (oldest,) = self._db.execute("SELECT key FROM archive WHERE id BETWEEN ? AND ? ORDER BY id LIMIT 1",
                                         (self._first, self._last)).fetchone()
            self._remove(oldest)
            self._db.execute("UPDATE archives SET dropped = dropped + 1 WHERE number = ?", (self._number,))
            if self.optimizes and self._counts()[2] % OPTIMIZE_EVERY == 0:
                self._db.execute("INSERT INTO archive_index (archive_index) VALUES ('optimize')")

    def _remove(self, key: int) -> None:
        self._db.execute("DELETE FROM archive WHERE session_id = ? AND key = ?", (self._session_id, key))

    def _clear(self) -> None:
        self._db.execute("DELETE FROM archive WHERE id BETWEEN ? AND ?", (self._first, self._last))

    def _counts(self) -> tuple[int, int, int]:
        """(entries, bytes, dropped)."""
        return self._db.execute("SELECT entries, bytes, dropped FROM archives WHERE number = ?",
                                (self._number,)).fetchone() or (0, 0, 0)

    # -- reading -----------------------------------------------------------------------------------------------------
    def search(self, query: str, limit: int = 3, coverage: float = 0.5) -> list[Passage]:
        """The best `limit` passages for `query` by BM25 over its distinctive words: not stopwords, and found in at
        most a quarter of the archive (words every turn shares, like "passage" in a chat about passages, would
        recall arbitrary turns). A passage must contain at least `coverage` of those words: a question about a
        fact ("my locker code") matches the turn that stated it on every word, while a long message shares a few
        words with many turns by chance. No such word or passage: nothing. BM25 weighs words by how rare they are
        in the whole index: the session's own archive, or every session's in a store."""
        words = sorted({w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS and len(w) > 1})
        if not words or limit < 1:
            return []
        with self._access():
            found = {w: self._documents(w) for w in words}
            common = max(2, self._counts()[0] // 4)
            # absent words count as rare (a fact's turn may have left); the rarest QUERY_WORDS are the query
            words = sorted((w for w in words if found[w] <= common), key=lambda w: (found[w], w))[:QUERY_WORDS]
            if not words:
                return []
            rows = self._db.execute("SELECT key, text, bm25(archive_index) FROM archive_index WHERE archive_index "
                                    "MATCH ? AND rowid BETWEEN ? AND ? ORDER BY bm25(archive_index) LIMIT ?",
                                    (" OR ".join(map(_quoted, words)), self._first, self._last, limit * 4)).fetchall()
        wanted = set(words)
        hits = [Passage(int(key), text, -score) for key, text, score in rows
                if len(wanted & set(re.findall(r"\w+", text.lower()))) >= coverage * len(wanted)]
        return hits[:limit]

    def _documents(self, word: str) -> int:
        """How many of this session's entries hold `word`."""
        return self._db.execute("SELECT COUNT(*) FROM archive_index WHERE archive_index MATCH ? "
                                "AND rowid BETWEEN ? AND ?", (_quoted(word), self._first, self._last)).fetchone()[0]

    def recall(self, query: str, tokenizer: Any, room: int, limit: int = 3,
               shown: Callable[[str], str] = lambda text: text) -> list[Passage]:
        """The best passages for `query` whose `shown` text (what goes back into the cache) fits `room` tokens
        together, a blank line between them."""
        return fit(self.search(query, limit) if len(self) else [], tokenizer, room, shown)

    def export(self) -> list[list]:
        """The entries, oldest first, as plain data."""
        with self._access():
            return [[int(k), t] for k, t in self._db.execute(
                "SELECT key, text FROM archive WHERE id BETWEEN ? AND ? ORDER BY id", (self._first, self._last))]

    def snapshot_entries(self) -> list[list]:
        """The entries a snapshot of its chat carries: all of them (a store-backed archive: none)."""
        return self.export()


def _quoted(word: str) -> str:
    """`word` as an FTS5 string: query syntax (quotes, NEAR, *, -) in a message is text, not an operator."""
    return '"' + word.replace('"', '""') + '"'


def fit(passages: list[Passage], tokenizer: Any, room: int,
        shown: Callable[[str], str] = lambda text: text) -> list[Passage]:
    """Those of `passages`, in order, whose `shown` text fits `room` tokens together (a blank line between them)."""
    chosen = []
    for passage in passages:
        size = len(tokenizer.encode(shown(passage.text))) + 2
        if size <= room:
            chosen.append(passage)
            room -= size
    return chosen
