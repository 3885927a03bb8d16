"""H2O (Zhang et al., 2023): keep heavy hitters — tokens with the most accumulated attention — plus recent."""

from __future__ import annotations

from dataclasses import dataclass

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    evicts = True
    needs_attention = True
    recent_tokens: int = 64
    sink_tokens: int = 4

    def observe(self, scores, attn, layer, step_tokens):
        return scores + attn  # accumulated over every step and layer since the token arrived

    def score(self, view):
        return protect(view.scores, self.recent_tokens, self.sink_tokens)
