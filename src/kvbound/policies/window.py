"""StreamingLLM (Xiao et al., 2023): keep the first `sink_tokens` tokens (attention sinks) and the newest."""

from __future__ import annotations

from dataclasses import dataclass

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class WindowPolicy(Policy):
    name = "window"
    evicts = True
    sink_tokens: int = 4

    def score(self, view):
        return protect(super().score(view), sinks=self.sink_tokens)
