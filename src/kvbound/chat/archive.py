"""The text of what a session's cache evicted, kept outside the KV and searchable: SQLite's built-in FTS5 index
(BM25 ranking, Porter stemming) under a byte cap. In process it is an in-memory database per session; the oldest
entries go first when the cap is reached. Owns no KV and no model state."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

DEFAULT_CAP_BYTES = 4 << 20  # 4 MiB of text: ~40,000 short turns
# Words that carry no fact: a question's "what is my" must not pull in every turn that says "my".
STOPWORDS = frozenset("""a an and are as at be but by can could did do does for from had has have he her his how i
if in is it its me my of on or our please she so that the their them then there these they this to too was we were
what when where which who why will with would you your""".split())


def _stem(word: str) -> str:
    """A crude stem for counting which query words a passage holds (FTS5's Porter stemmer ranks; this only counts)."""
    return word[:5]


@dataclass(frozen=True)
class Passage:
    key: int  # the turn (chat) or passage number (raw prompt) it came from
    text: str
    score: float  # BM25, higher is better


class Archive:
    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES):
        if cap_bytes < 1:
            raise ValueError(f"the archive's byte cap must be positive, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE passages USING fts5(key UNINDEXED, text, "
                         "tokenize='porter unicode61')")
        self._bytes = 0
        self.dropped = 0  # entries the cap pushed out

    @property
    def nbytes(self) -> int:
        """Bytes of archived text (UTF-8); the index adds about as much again."""
        return self._bytes

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM passages").fetchone()[0]

    def keys(self) -> set[int]:
        return {int(k) for (k,) in self._db.execute("SELECT key FROM passages")}

    def add(self, key: int, text: str) -> None:
        """Archive `text` under `key` (replacing what the key held); the oldest entries leave past the cap."""
        self.remove(key)
        data = text.encode("utf-8")[: self.cap_bytes].decode("utf-8", "ignore")
        self._db.execute("INSERT INTO passages (key, text) VALUES (?, ?)", (key, data))
        self._bytes += len(data.encode("utf-8"))
        while self._bytes > self.cap_bytes:
            rowid, old = self._db.execute("SELECT rowid, text FROM passages ORDER BY rowid LIMIT 1").fetchone()
            self._db.execute("DELETE FROM passages WHERE rowid = ?", (rowid,))
            self._bytes -= len(old.encode("utf-8"))
            self.dropped += 1

    def remove(self, key: int) -> None:
        for rowid, old in self._db.execute("SELECT rowid, text FROM passages WHERE key = ?", (key,)).fetchall():
            self._db.execute("DELETE FROM passages WHERE rowid = ?", (rowid,))
            self._bytes -= len(old.encode("utf-8"))

    def search(self, query: str, limit: int = 3, coverage: float = 0.5) -> list[Passage]:
        """The best `limit` passages for `query` by BM25 over its distinctive words: not stopwords, and found in at
        most a quarter of the archive (words every turn shares, like "passage" in a chat about passages, would
        recall arbitrary turns). A passage must contain at least `coverage` of those words: a question about a
        fact ("my locker code") matches the turn that stated it on every word, while a long message shares a few
        words with many turns by chance. No such word or passage: nothing."""
        words = sorted({w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS and len(w) > 1})
        if not words or limit < 1:
            return []
        common = max(2, len(self) // 4)
        words = [w for w in words if self._frequency(w) <= common]
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        rows = self._db.execute("SELECT key, text, bm25(passages) FROM passages WHERE passages MATCH ? "
                                "ORDER BY bm25(passages) LIMIT ?", (match, limit * 4)).fetchall()
        stems = {_stem(w) for w in words}
        found = [Passage(int(key), text, -score) for key, text, score in rows
                 if len(stems & {_stem(w) for w in re.findall(r"\w+", text.lower())}) >= coverage * len(stems)]
        return found[:limit]

    def recall(self, query: str, tokenizer: Any, room: int, limit: int = 3) -> list[Passage]:
        """The best passages for `query` that fit `room` tokens together (a blank line between them)."""
        chosen = []
        for passage in self.search(query, limit) if len(self) else []:
            size = len(tokenizer.encode(passage.text)) + 2
            if size <= room:
                chosen.append(passage)
                room -= size
        return chosen

    def _frequency(self, word: str) -> int:
        """Entries that contain `word` (after stemming)."""
        return self._db.execute("SELECT count(*) FROM passages WHERE passages MATCH ?",
                                ('"' + word.replace('"', '""') + '"',)).fetchone()[0]

    def export(self) -> list[list]:
        """The entries, oldest first, as plain data (a snapshot carries them)."""
        return [[int(k), t] for k, t in self._db.execute("SELECT key, text FROM passages ORDER BY rowid")]

    def restore(self, entries: list[list]) -> None:
        for key, text in entries:
            self.add(int(key), text)
