"""Admission to the shared KV pool: before a turn runs it reserves the blocks it may reach (its prompt plus
max_tokens, within its cache's capacity), so interleaved turns never run the pool dry mid-reply. Room is made by
offloading idle sessions, least recently used first; when the turns in progress hold the rest, admission raises
PoolBusy and the engine worker keeps the request queued until room frees (scheduler.py). A turn that can never fit is left to the Chat's own refusal (413). Runs on the worker.

Refused turns queue first come, first served: while the oldest refused turn still retries, a later turn is admitted
only if the room it takes leaves enough for that one — otherwise small turns could take every block that frees up
and a large turn would wait forever (without this rule, benchmarks/load.py with 8 clients saw one turn refused 144
times over 300 s). A waiter that stops retrying for WAITER_TTL_S loses its place."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvbound.errors import ContextOverflowError
from kvbound.kvcache.spec import format_bytes
from kvbound.server.errors import PoolBusy

if TYPE_CHECKING:
    from kvbound.kvcache.pool import BlockPool
    from kvbound.server.sessions import Session, SessionRegistry


WAITER_TTL_S = 10.0  # a refused turn keeps its place this long after its last retry (clients wait Retry-After: 1)


@dataclass
class _Waiter:
    need: int  # blocks the turn asked for when last refused
    since: float  # first refusal (the queue's order)
    seen: float  # last retry


class PoolAdmission:
    def __init__(self, pool: "BlockPool", registry: "SessionRegistry", clock=time.monotonic):
        self.pool, self.registry, self.clock = pool, registry, clock
        self._reserved: dict[str, tuple["Session", int]] = {}  # session id → (session, blocks it may hold)
        self._waiting: dict[str, _Waiter] = {}  # session id → its refused turn, oldest first

    @property
    def outstanding_blocks(self) -> int:
        """Blocks the turns in progress may still take beyond what they hold now."""
        return sum(max(0, blocks - session.kv_blocks) for session, blocks in self._reserved.values())

    @property
    def available_blocks(self) -> int:
        return self.pool.free_blocks - self.outstanding_blocks

    def admit(self, session: "Session", held: int, feed: int, max_tokens: int, queue: bool = True) -> int:
        """Reserve room for a turn of `session` whose cache holds `held` tokens, feeds `feed` and generates up to
        `max_tokens`; return the blocks reserved. Raises ContextOverflowError if the prompt cannot fit the
        session's capacity, PoolBusy if turns in progress (or an earlier refused turn) hold the room it needs.
        `queue`: whether a refusal keeps the turn's place (False when its retry would come as another session)."""
        spec, capacity = self.pool.spec, self.registry.capacity
        pinned = 0 if self.registry.evicts else held  # an evicting cache makes room within its capacity
        if pinned + feed + 1 > capacity:
            self._waiting.pop(session.id, None)
            raise ContextOverflowError(
                f"this turn needs about {pinned + feed + 1:,} tokens of context ({pinned:,} held by the "
                f"conversation) and a session holds at most {capacity:,} (the shared KV budget); send a shorter "
                "conversation, start a new session, raise --kv-budget or serve with an evicting --policy",
                needed=pinned + feed + 1, available=capacity)
        total = min(capacity, held + feed + max_tokens)
        need = max(0, spec.blocks_for(total) - session.kv_blocks)
        while self.available_blocks < need and self.registry.offload_idle(exclude=session):
            pass
        short = need - self.available_blocks
        others = [s for s, _ in self._reserved.values() if s is not session]
        now = self.clock()
        if short > 0 and others:
            if queue:
                self._wait(session.id, need, now)
            raise PoolBusy(
                f"the shared KV pool has {max(self.available_blocks, 0)} blocks free for new work "
                f"({max(self.available_blocks, 0) * spec.block_size:,} tokens) and this turn may need {need} "
                f"({need * spec.block_size:,} tokens, {format_bytes(need * spec.bytes_per_block)}); "
                f"{len(others)} other request(s) hold the rest; retry shortly, lower max_tokens or raise --kv-budget",
                needed=need, available=max(self.available_blocks, 0))
        head = self._head(session.id, now)
        if head is not None and need > 0 and self.available_blocks - need < head.need:
            if queue:
                self._wait(session.id, need, now)
            raise PoolBusy(
                f"an earlier request has waited {now - head.since:.0f} s for {head.need} blocks of the shared KV "
                f"pool ({head.need * spec.block_size:,} tokens) and goes first; {max(self.available_blocks, 0)} "
                f"are free and this turn may need {need}; retry shortly", needed=need,
                available=max(self.available_blocks - head.need, 0))
        self._waiting.pop(session.id, None)
        # Alone and still short (it cannot happen while the reservation stays within the capacity) the turn runs
        # anyway: the cache evicts per policy or the Chat refuses it with the numbers.
        blocks = session.kv_blocks + need
        self._reserved[session.id] = (session, blocks)
        return blocks

    def release(self, session: "Session") -> None:
        self._reserved.pop(session.id, None)

    def _wait(self, session_id: str, need: int, now: float) -> None:
        waiter = self._waiting.get(session_id)
        if waiter is None:
            self._waiting[session_id] = _Waiter(need, now, now)
        else:
            waiter.need, waiter.seen = need, now

    def _head(self, session_id: str, now: float) -> _Waiter | None:
        """The oldest refused turn still retrying, if it was refused before this session's own (expired ones are
        dropped)."""
        for sid in [sid for sid, w in self._waiting.items() if now - w.seen > WAITER_TTL_S]:
            del self._waiting[sid]
        mine = self._waiting.get(session_id)
        head = next((w for sid, w in self._waiting.items() if sid != session_id), None)
        return head if head is not None and (mine is None or head.since < mine.since) else None

    @property
    def reserved_blocks(self) -> int:
        return sum(blocks for _, blocks in self._reserved.values())
