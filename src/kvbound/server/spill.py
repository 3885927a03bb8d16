"""Offloaded sessions' KV on disk, so that bringing a session back reads its state instead of prefilling its
history again. When the shared pool runs out of blocks the server offloads an idle session (server/admission.py);
its cache state (Chat.export_state, as chat/snapshot.py's bytes: KV in its storage format, transcript, archive
unless a SessionStore keeps it) goes to one file here, and its next turn restores it in milliseconds where a
prefill of ~700 tokens takes seconds on a CPU. Files, not process memory: the KV budget bounds what the process holds, and the page cache is the
kernel's. Each server process has its own directory, under `--data-dir`/spill or the system's temporary directory,
removed at shutdown (or by the next server on the host, if the process was killed); its bytes are capped
(`--spill-budget`): past the cap the oldest files go, and those sessions are rebuilt from their messages as
before. A file that cannot be read or is of other messages is dropped the same way: the messages are never lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kvbound.chat import snapshot
from kvbound.errors import KvboundError

logger = logging.getLogger("kvbound.server")
SPILL_PREFIX = "kvbound-spill-"  # then host-pid-random: a directory per server process


def _remove_stale(parent: Path) -> None:
    """Spill directories that processes of this host left behind when they were killed (their sessions are gone
    with them); another host's, or a live process's, are not touched."""
    host = f"{SPILL_PREFIX}{socket.gethostname()}-"
    for stale in parent.glob(f"{host}*"):
        pid = stale.name[len(host):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spill:
    def __init__(self, budget: int, parent: Path | None = None):
        """`parent`: where this process's own spill directory goes (`--data-dir`/spill; None: the system's temporary
        directory). Several servers may share it (Ray replicas on one --data-dir): each writes only its own."""
        self.budget = budget
        prefix = f"{SPILL_PREFIX}{socket.gethostname()}-{os.getpid()}-"
        try:
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(parent or Path(tempfile.gettempdir()))
            directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as e:
            raise KvboundError(f"the spill directory under {parent or tempfile.gettempdir()}: {e.strerror}; give a "
                               "writable --data-dir or --spill-budget 0") from None
        self.directory = directory
        # The directory goes with the spill (or at exit), whoever forgets to close it.
        self._cleanup = weakref.finalize(self, shutil.rmtree, directory, True)
        self._files: OrderedDict[str, tuple[Path, int, Any]] = OrderedDict()  # id -> (file, bytes, its note)
        self.bytes = 0
        self.written = self.restored = self.dropped = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._files

    def note(self, session_id: str) -> Any:
        """What the caller kept in memory beside the session's spilled state (`put`'s `note`)."""
        return self._files[session_id][2]

    def put(self, session_id: str, state: dict[str, Any], note: Any = None) -> bool:
        """Write the session's exported chat state (and keep `note`, a few facts about it, in memory); False
        (nothing kept) if it alone exceeds the budget or the write fails. Older files go first when the budget
        would be crossed."""
        self.discard(session_id)
        size = snapshot.state_bytes(state)  # the file adds a small header
        if size > self.budget:
            return False
        while self._files and self.bytes + size > self.budget:
            self._drop(next(iter(self._files)))
        path = self.directory / f"{session_id}.kvs"
        try:
            size = snapshot.write_file(state, path)
        except OSError as e:
            logger.warning("session '%s': could not spill its KV (%s); it will be rebuilt from its messages",
                           session_id, e.strerror)
            path.unlink(missing_ok=True)
            return False
        self._files[session_id] = (path, size, note)
        self.bytes += size
        while self.bytes > self.budget and len(self._files) > 1:  # the header tipped it over
            self._drop(next(iter(self._files)))
        if self.bytes > self.budget:
            self._drop(session_id)
            return False
        self.written += 1
        return True

    def take(self, session_id: str, messages: list[dict[str, str]]) -> dict[str, Any] | None:
        """The session's state, removed from the spill; None if there is none or it is unreadable or of other
        messages than `messages` (the file is dropped either way)."""
        if session_id not in self._files:
            return None
        path = self._files[session_id][0]
        try:
            state = snapshot.read_file(path)
            snapshot.check_messages(state, messages, "the session's")
        except (OSError, snapshot.SnapshotError, KeyError, TypeError) as e:
            logger.warning("session '%s': its spilled KV is not usable (%s); rebuilding it from its messages",
                           session_id, e)
            self._drop(session_id)
            return None
        self.discard(session_id)
        self.restored += 1
        return state

    def discard(self, session_id: str) -> None:
        entry = self._files.pop(session_id, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)
            self.bytes -= entry[1]

    def _drop(self, session_id: str) -> None:
        self.discard(session_id)
        self.dropped += 1

    def close(self) -> None:
        for session_id in list(self._files):
            self.discard(session_id)
        self._cleanup()

    def report(self) -> dict[str, Any]:
        return {"sessions": len(self._files), "bytes": self.bytes, "budget": self.budget,
                "directory": str(self.directory), "written": self.written, "restored": self.restored,
                "dropped": self.dropped}
