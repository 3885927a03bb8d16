"""The text of what a session's cache evicted, kept outside the KV and searchable: SQLite's built-in FTS5 index
(BM25 ranking) under a byte cap. In process it is an in-memory database per session; the oldest entries go first
when the cap is reached. Owns no KV and no model state."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

DEFAULT_CAP_BYTES = 1 << 20  # 1 MiB of text: ~1,000 turns of 150 words (benchmarks/archive.py measures the pages)
QUERY_WORDS = 12  # a message is searched by its rarest distinctive words: long messages cost no more than short
OPTIMIZE_EVERY = 500  # entries dropped between merges of the index (deleted rows keep pages until then)
# Words that carry no fact: a question's "what is my" must not pull in every turn that says "my".
STOPWORDS = frozenset("""a an and are as at be but by can could did do does for from had has have he her his how i
if in is it its me my of on or our please she so that the their them then there these they this to too was we were
what when where which who why will with would you your""".split())


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
        self._db.execute("CREATE VIRTUAL TABLE passages USING fts5(key UNINDEXED, text, tokenize='unicode61')")
        self._db.execute("CREATE VIRTUAL TABLE vocabulary USING fts5vocab(passages, 'row')")  # term → documents
        self._bytes = 0
        self._entries: dict[int, tuple[int, int]] = {}  # key → (rowid, bytes), oldest first (insertion order)
        self.dropped = 0  # entries the cap pushed out

    @property
    def nbytes(self) -> int:
        """Bytes of archived text (UTF-8); the index adds about as much again."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> set[int]:
        return set(self._entries)

    def add(self, key: int, text: str) -> None:
        """Archive `text` under `key` (replacing what the key held); the oldest entries leave past the cap. Each
        step is a lookup by rowid: the cost does not grow with the archive."""
        self.remove(key)
        data = text.encode("utf-8")[: self.cap_bytes].decode("utf-8", "ignore")
        rowid = self._db.execute("INSERT INTO passages (key, text) VALUES (?, ?)", (key, data)).lastrowid
        size = len(data.encode("utf-8"))
        self._entries[key] = (rowid, size)
        self._bytes += size
        while self._bytes > self.cap_bytes:
            self.remove(next(iter(self._entries)))
            self.dropped += 1
            if self.dropped % OPTIMIZE_EVERY == 0:
                self._db.execute("INSERT INTO passages (passages) VALUES ('optimize')")

    def remove(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._db.execute("DELETE FROM passages WHERE rowid = ?", (entry[0],))
            self._bytes -= entry[1]

    def search(self, query: str, limit: int = 3, coverage: float = 0.5) -> list[Passage]:
        """The best `limit` passages for `query` by BM25 over its distinctive words: not stopwords, and found in at
        most a quarter of the archive (words every turn shares, like "passage" in a chat about passages, would
        recall arbitrary turns). A passage must contain at least `coverage` of those words: a question about a
        fact ("my locker code") matches the turn that stated it on every word, while a long message shares a few
        words with many turns by chance. No such word or passage: nothing."""
        words = sorted({w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS and len(w) > 1})
        if not words or limit < 1:
            return []
        found = dict(self._db.execute(f"SELECT term, doc FROM vocabulary WHERE term IN ({','.join('?' * len(words))})",
                                      words).fetchall())
        common = max(2, len(self) // 4)
        # absent words count as rare (a fact's turn may have left); the rarest QUERY_WORDS are the query
        words = sorted((w for w in words if found.get(w, 0) <= common), key=lambda w: (found.get(w, 0), w))
        words = words[:QUERY_WORDS]
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        rows = self._db.execute("SELECT key, text, bm25(passages) FROM passages WHERE passages MATCH ? "
                                "ORDER BY bm25(passages) LIMIT ?", (match, limit * 4)).fetchall()
        wanted = set(words)
        hits = [Passage(int(key), text, -score) for key, text, score in rows
                if len(wanted & set(re.findall(r"\w+", text.lower()))) >= coverage * len(wanted)]
        return hits[:limit]

    def recall(self, query: str, tokenizer: Any, room: int, limit: int = 3) -> list[Passage]:
        """The best passages for `query` that fit `room` tokens together (a blank line between them)."""
        chosen = []
        for passage in self.search(query, limit) if len(self) else []:
            size = len(tokenizer.encode(passage.text)) + 2
            if size <= room:
                chosen.append(passage)
                room -= size
        return chosen

    @property
    def memory_bytes(self) -> int:
        """What the database holds in memory: its pages (the text, the index, and free pages it reuses)."""
        count = self._db.execute("PRAGMA page_count").fetchone()[0]
        return count * self._db.execute("PRAGMA page_size").fetchone()[0]

    def export(self) -> list[list]:
        """The entries, oldest first, as plain data (a snapshot carries them)."""
        return [[int(k), t] for k, t in self._db.execute("SELECT key, text FROM passages ORDER BY rowid")]

    def restore(self, entries: list[list]) -> None:
        for key, text in entries:
            self.add(int(key), text)
