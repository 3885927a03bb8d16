"""A session's recall archive kept in its SessionStore's file (chat/persistence.py makes it): the Archive's tables
and search, on the store's connection, under the store's lock. Writes wait in process until the store's next
transaction for the session, so the entries a turn archived are committed with that turn (SessionStore.save_turn)
or, if something reads the archive first, just before."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from typing import Any, Callable, ContextManager, Iterator

from kvbound.chat.archive import Archive


class StoredArchive(Archive):
    """One session's archive in a store: its SQL runs under the store's `lock`, in a write transaction
    (`transaction()`, which takes the lock) when writes wait, and those go first. Used by one thread at a time, like
    its chat."""

    stored = True
    # Merging the index rewrites every session's entries in the file (seconds for a large store); FTS5's own
    # incremental merges reclaim deleted rows' pages there, and the file reuses free pages.
    optimizes = False

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, transaction: Callable[[], ContextManager[Any]],
                 session_id: str, number: int, cap_bytes: int):
        super().__init__(cap_bytes, db, session_id, number)
        self._lock, self._transaction = lock, transaction
        self._pending: list[tuple[Any, ...]] = []  # ("add", key, text) | ("remove", key) | ("clear",), in order

    def _access(self) -> ContextManager[Any]:
        return self._writing() if self._pending else self._lock

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._transaction():
            written = self.write_pending()
            yield
        self.forget_written(written)

    # -- writing waits for the store's transaction ------------------------------------------------------------------
    def add(self, key: int, text: str) -> None:
        self._pending.append(("add", key, text))

    def remove(self, key: int) -> None:
        self._pending.append(("remove", key))

    def clear(self) -> None:
        self._pending.append(("clear",))

    def restore(self, entries: list[list]) -> None:
        self._pending.extend(("add", int(key), text) for key, text in entries)

    def write_pending(self) -> int:
        """Apply the waiting writes; the caller holds the store's lock inside a transaction (a rolled-back one
        leaves them waiting: `forget_written` once committed). Returns how many to forget then."""
        for operation, *args in self._pending:
            {"add": self._add, "remove": self._remove, "clear": self._clear}[operation](*args)
        return len(self._pending)

    def forget_written(self, count: int) -> None:
        del self._pending[:count]

    def flush(self) -> None:
        """Write what waits now, in a transaction of its own."""
        with self._writing():
            pass

    # -- what it costs where ----------------------------------------------------------------------------------------
    @property
    def memory_bytes(self) -> int:
        """In process: only the text of writes still waiting (a turn's at most); the rest is in the store's file."""
        return sum(len(op[2].encode("utf-8")) for op in self._pending if op[0] == "add")

    @property
    def stored_bytes(self) -> int:
        """Bytes of its text in the store's file; the index there adds about as much again."""
        return self.nbytes

    def snapshot_entries(self) -> list[list]:
        return []  # the store's table keeps them
