"""Which replica answers a request: a request's affinity key (its `session_id`, else a hash of its history's
prefix), the session→replica table the ingress keeps, each replica's load report, and placement (a new session
goes to the replica with the most free KV blocks; none can take it: a refusal that carries every replica's
numbers). Plain Python, no Ray: the ingress calls it and the unit tests drive it with made-up reports."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from kvbound.kvcache.spec import format_bytes
from kvbound.server.protocol import SESSION_ID_PATTERN

SESSION_ID = re.compile(SESSION_ID_PATTERN)
SESSION_PREFIX, HISTORY_PREFIX = "session:", "history:"
MAX_TABLE = 100_000  # keys kept; a key dropped past this is placed again (a named session restores from the store)


def session_key(session_id: str) -> str:
    return SESSION_PREFIX + session_id


def explicit_id(key: str | None) -> str | None:
    """The session id of a `session:` key (the replica it moves to restores it from the store), else None."""
    return key[len(SESSION_PREFIX):] if key is not None and key.startswith(SESSION_PREFIX) else None


def affinity_key(body: Any) -> str | None:
    """The key that keeps a chat request on the replica holding its conversation's KV: `session:<id>` when the body
    names a session; else `history:<hash>` of the conversation's prefix — the system prompt and the first user
    message, which every later request of the conversation repeats (clients resend the whole history). None for a
    body that is not a chat request (any replica answers it, with the 400 it deserves)."""
    if not isinstance(body, dict):
        return None
    session_id = body.get("session_id")
    if isinstance(session_id, str) and SESSION_ID.match(session_id):
        return session_key(session_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    prefix = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # text parts, as protocol.Message.text() joins them
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        prefix.append(("system" if role == "developer" else role, content))
        if role == "user":
            break
    digest = hashlib.sha256(json.dumps(prefix, ensure_ascii=False).encode()).hexdigest()[:32]
    return HISTORY_PREFIX + digest


class SessionTable:
    """Affinity key → replica name, least recently used dropped past `limit`; and the requests in flight per key
    (a session answering one request must not be moved by a second: two replicas would write its turns)."""

    def __init__(self, limit: int = MAX_TABLE):
        self.limit = limit
        self._owner: OrderedDict[str, str] = OrderedDict()
        self.in_flight: Counter[str] = Counter()

    def owner(self, key: str) -> str | None:
        name = self._owner.get(key)
        if name is not None:
            self._owner.move_to_end(key)
        return name

    def assign(self, key: str, replica: str) -> None:
        self._owner[key] = replica
        self._owner.move_to_end(key)
        while len(self._owner) > self.limit:
            self._owner.popitem(last=False)

    def forget(self, key: str) -> None:
        self._owner.pop(key, None)

    def counts(self) -> Counter[str]:
        """Keys per replica."""
        return Counter(self._owner.values())

    def __len__(self) -> int:
        return len(self._owner)


@dataclass
class Report:
    """A replica's load, read on its engine worker (kvbound.cluster.replica): what placement compares."""

    replica: str
    blocks: int  # the replica's KV pool
    free_blocks: int  # held by nobody
    available_blocks: int  # free, less what turns in progress reserved
    reclaimable_blocks: int  # available + held by idle sessions (offloaded to make room)
    block_tokens: int
    block_bytes: int
    sessions: int
    droppable_sessions: int  # idle sessions found by history: dropped when the session limit is reached
    max_sessions: int
    active: int
    queued: int
    max_queued: int
    actor: str = ""
    pid: int = 0

    def refusal(self) -> str | None:
        """Why this replica cannot take a new session now, or None if it can."""
        if self.reclaimable_blocks < 1:
            return "every KV block is held by turns in progress"
        if self.sessions >= self.max_sessions and self.droppable_sessions == 0:
            return f"it holds {self.sessions} sessions, its limit"
        if self.queued >= self.max_queued:
            return f"{self.queued} requests wait for its engine, its limit"
        return None

    def describe(self) -> str:
        tokens = self.available_blocks * self.block_tokens
        return (f"{self.replica}: {max(self.available_blocks, 0)} of {self.blocks} KV blocks free for new work "
                f"({max(tokens, 0):,} tokens, {format_bytes(max(self.available_blocks, 0) * self.block_bytes)} of "
                f"{format_bytes(self.blocks * self.block_bytes)}), {self.sessions}/{self.max_sessions} sessions, "
                f"{self.active} answering, {self.queued} queued")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank(reports: Iterable[Report], assigned: Counter[str] | None = None) -> list[Report]:
    """Replicas in the order a new session tries them: those that can take one first — the most free KV blocks
    (available to new work), then the fewest sessions this ingress sent there, the fewest sessions, the name —
    then those that cannot, in the same order."""
    assigned = assigned or Counter()
    return sorted(reports, key=lambda r: (r.refusal() is not None, -r.available_blocks, assigned[r.replica],
                                          r.sessions, r.replica))


def place(reports: Iterable[Report], assigned: Counter[str] | None = None) -> Report | None:
    """The replica a new session goes to; None when every replica is full."""
    best = next(iter(rank(reports, assigned)), None)
    return best if best is not None and best.refusal() is None else None


def cluster_full_message(reports: list[Report], down: Iterable[str] = (), said: dict[str, str] | None = None) -> str:
    """The 429 message when no replica can take a request: each replica's numbers (and what it answered, when it
    refused the request itself) and what to do."""
    said = dict(said or {})
    parts = [f"{r.describe()} ({said.pop(r.replica, None) or r.refusal() or 'refused the request: busy'})"
             for r in reports]
    parts += [f"{name}: {message}" for name, message in sorted(said.items())]
    parts += [f"{name}: not answering" for name in sorted(down)]
    return ((f"all {len(parts)} replicas are full — " if len(parts) > 1 else "the only replica is full — ") +
            "; ".join(parts) +
            ". Retry shortly, delete idle sessions (DELETE /v1/sessions/{id}), lower max_tokens, raise --kv-budget "
            "or add replicas (--replicas)")
