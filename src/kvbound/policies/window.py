"""StreamingLLM (Xiao et al., 2023): keep the first `sink_tokens` tokens (attention sinks) and the newest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbound.policies.base import Policy, register


@register
@dataclass
class WindowPolicy(Policy):
    name = "window"
    evicts = True
    sink_tokens: int = 4

    def score(self, cache) -> torch.Tensor:
        scores = torch.arange(cache.n, dtype=torch.float32, device=cache.positions.device)
        scores[: self.sink_tokens] = float("inf")
        return scores
