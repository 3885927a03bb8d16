"""The policy contract: `score()` ranks held tokens (higher = keep); `select()` (shared) picks the lowest
unpinned ones. Policies that need attention set `needs_attention` and get `observe()` calls per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvbound.kvcache.paged import PagedCache

_REGISTRY: dict[str, type["Policy"]] = {}


def register(cls: type["Policy"]) -> type["Policy"]:
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type["Policy"]]:
    return dict(_REGISTRY)


@register
@dataclass
class Policy:
    """`none`: never evicts; a full cache refuses the step with KVBudgetExceeded."""

    name = "none"
    evicts = False
    needs_attention = False

    def observe(self, cache: "PagedCache", layer: int, attn: torch.Tensor, step_tokens: int) -> None:
        """attn: (S,) attention of this step's last queries on every held token, averaged over heads."""

    def score(self, cache: "PagedCache") -> torch.Tensor:
        """(n,) float: how much each held token is worth keeping."""
        return torch.arange(cache.n, dtype=torch.float32, device=cache.positions.device)

    def select(self, cache: "PagedCache", count: int, pinned: torch.Tensor) -> torch.Tensor:
        scores = self.score(cache).clone()
        scores[pinned] = float("inf")
        return torch.topk(scores, count, largest=False).indices


def recency_protect(scores: torch.Tensor, recent: int) -> torch.Tensor:
    """Keep the newest `recent` tokens whatever their score (H2O/SnapKV/TOVA all keep a local window)."""
    if recent > 0:
        scores = scores.clone()
        scores[-recent:] = float("inf")
    return scores
