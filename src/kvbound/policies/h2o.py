"""H2O (Zhang et al., 2023): keep heavy hitters — tokens with the most accumulated attention — plus recent."""

from __future__ import annotations

from dataclasses import dataclass

from kvbound.policies.base import Policy, recency_protect, register


@register
@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    evicts = True
    needs_attention = True
    recent_tokens: int = 64
    sink_tokens: int = 4

    def observe(self, cache, layer, attn, step_tokens):
        cache.scores[: attn.numel()] += attn

    def score(self, cache):
        scores = recency_protect(cache.scores[: cache.n], self.recent_tokens)
        scores[: self.sink_tokens] = float("inf")
        return scores
