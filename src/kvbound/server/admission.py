"""Admission to the shared KV pool: before a turn runs it reserves the blocks it may reach (its prompt plus
max_tokens, within its cache's capacity), so interleaved turns never run the pool dry mid-reply. Room is made by
offloading idle sessions, least recently used first; when the turns in progress hold the rest, the request is
refused as busy (429). A turn that can never fit is left to the Chat's own refusal (413). Runs on the worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbound.errors import ContextOverflowError
from kvbound.kvcache.spec import format_bytes
from kvbound.server.errors import ServerBusy

if TYPE_CHECKING:
    from kvbound.kvcache.pool import BlockPool
    from kvbound.server.sessions import Session, SessionRegistry


class PoolAdmission:
    def __init__(self, pool: "BlockPool", registry: "SessionRegistry"):
        self.pool, self.registry = pool, registry
        self._reserved: dict[str, tuple["Session", int]] = {}  # session id → (session, blocks it may hold)

    @property
    def outstanding_blocks(self) -> int:
        """Blocks the turns in progress may still take beyond what they hold now."""
        return sum(max(0, blocks - session.kv_blocks) for session, blocks in self._reserved.values())

    @property
    def available_blocks(self) -> int:
        return self.pool.free_blocks - self.outstanding_blocks

    def admit(self, session: "Session", held: int, feed: int, max_tokens: int) -> int:
        """Reserve room for a turn of `session` whose cache holds `held` tokens, feeds `feed` and generates up to
        `max_tokens`; return the blocks reserved. Raises ContextOverflowError if the prompt cannot fit the
        session's capacity, ServerBusy if turns in progress hold the room it needs."""
        spec, capacity = self.pool.spec, self.registry.capacity
        pinned = 0 if self.registry.evicts else held  # an evicting cache makes room within its capacity
        if pinned + feed + 1 > capacity:
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
        if short > 0 and others:
            raise ServerBusy(
                f"the shared KV pool has {max(self.available_blocks, 0)} blocks free for new work "
                f"({max(self.available_blocks, 0) * spec.block_size:,} tokens) and this turn may need {need} "
                f"({need * spec.block_size:,} tokens, {format_bytes(need * spec.bytes_per_block)}); "
                f"{len(others)} other request(s) hold the rest; retry shortly, lower max_tokens or raise --kv-budget",
                needed=need, available=max(self.available_blocks, 0))
        # Alone and still short (it cannot happen while the reservation stays within the capacity) the turn runs
        # anyway: the cache evicts per policy or the Chat refuses it with the numbers.
        blocks = session.kv_blocks + need
        self._reserved[session.id] = (session, blocks)
        return blocks

    def release(self, session: "Session") -> None:
        self._reserved.pop(session.id, None)

    @property
    def reserved_blocks(self) -> int:
        return sum(blocks for _, blocks in self._reserved.values())
