"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most; scores are replaced each step."""

from __future__ import annotations

from dataclasses import dataclass

from kvbound.policies.base import Policy, recency_protect, register


@register
@dataclass
class TOVAPolicy(Policy):
    name = "tova"
    evicts = True
    needs_attention = True
    recent_tokens: int = 16

    def observe(self, cache, layer, attn, step_tokens):
        if layer == 0:
            cache.scores[: attn.numel()] = 0.0
        cache.scores[: attn.numel()] += attn

    def score(self, cache):
        return recency_protect(cache.scores[: cache.n], self.recent_tokens)
