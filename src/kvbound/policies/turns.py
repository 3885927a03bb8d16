"""Chat-aware eviction: the system prompt, the current message and the newest turns are pinned (by the chat
session); among the rest whole oldest turns go first, and inside a turn the inner policy's scores decide.
`summarize` is the same order, and the chat writes a pinned note about every turn it evicts (chat/memory.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbound.policies.base import Policy, register
from kvbound.policies.window import WindowPolicy


@register
@dataclass
class TurnsPolicy(Policy):
    name = "turns"
    evicts = True
    inner: Policy = field(default_factory=WindowPolicy)
    recent_turns: int = 1

    def __post_init__(self) -> None:
        self.name = f"{type(self).name}+{self.inner.name}" if self.inner.name != "window" else type(self).name
        self.needs_attention = self.inner.needs_attention
        self.needs_keys = self.inner.needs_keys
        self.per_head = self.inner.per_head
        self.scores_writes = self.inner.scores_writes
        self.key_moments = self.inner.key_moments

    def ingest(self, q, k, v) -> torch.Tensor:
        return self.inner.ingest(q, k, v)

    def score_heads(self, view) -> torch.Tensor:
        return self.inner.score_heads(view)  # heads choose inside a segment; `score` chose the segments

    def observe(self, scores, attn, layer, step_tokens):
        return self.inner.observe(scores, attn, layer, step_tokens)

    def score(self, view) -> torch.Tensor:
        inner = self.inner.score(view)
        # The inner order as ranks in [0, 1), so the turn index dominates (older turns always rank lower) and the
        # inner order survives whole inside a turn: no two scores tie, whatever their scale (inf included).
        rank = torch.argsort(torch.argsort(inner, stable=True)).float() / max(view.n, 1)
        return view.segments.float() + rank


@register
@dataclass
class SummarizePolicy(TurnsPolicy):
    name = "summarize"
    summarizes = True
