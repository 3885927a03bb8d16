"""Chat-aware eviction: the system prompt, the current message and the newest turns are pinned (by the chat
session); among the rest whole oldest turns go first, and inside a turn the inner policy's scores decide."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbound.policies.base import Policy


@dataclass
class TurnsPolicy(Policy):
    name = "turns"
    evicts = True
    inner: Policy = field(default_factory=Policy)
    recent_turns: int = 1
    summarize: bool = False  # the chat writes a summary of evicted turns and keeps it pinned (see chat/memory.py)

    def __post_init__(self) -> None:
        self.name = "summarize" if self.summarize else f"turns+{self.inner.name}"
        self.needs_attention = self.inner.needs_attention

    def observe(self, cache, layer, attn, step_tokens):
        self.inner.observe(cache, layer, attn, step_tokens)

    def score(self, cache) -> torch.Tensor:
        inner = self.inner.score(cache)
        finite = inner[torch.isfinite(inner)]
        # Squash the inner scores into [0, 1) so the turn index dominates: older turns always rank lower.
        lo, hi = (finite.min(), finite.max()) if finite.numel() else (torch.tensor(0.0), torch.tensor(1.0))
        inner = ((inner - lo) / (hi - lo + 1e-9)).clamp(0.0, 0.999)
        return cache.segments[: cache.n].float() + inner
