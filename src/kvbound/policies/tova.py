"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most; scores are replaced each step."""

from __future__ import annotations

from dataclasses import dataclass

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class TOVAPolicy(Policy):
    name = "tova"
    evicts = True
    needs_attention = True
    recent_tokens: int = 16

    def observe(self, scores, attn, layer, step_tokens):
        return attn if layer == 0 else scores + attn  # this step's attention, summed over layers

    def score(self, view):
        return protect(view.scores, self.recent_tokens)
