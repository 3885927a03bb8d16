"""SnapKV (Li et al., 2024): at each prefill, the last queries (the observation window) vote for the tokens
to keep; votes are max-pooled over neighbours so kept tokens come with their context."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class SnapKVPolicy(Policy):
    name = "snapkv"
    evicts = True
    needs_attention = True
    kernel: int = 7
    recent_tokens: int = 32
    sink_tokens: int = 4

    def observe(self, scores, attn, layer, step_tokens):
        if step_tokens == 1:
            return scores  # decode steps keep the votes of the last prefill
        pooled = F.max_pool1d(attn[None, None], self.kernel, stride=1, padding=self.kernel // 2)[0, 0]
        return pooled if layer == 0 else scores + pooled  # a prefill's votes, summed over its layers

    def score(self, view):
        return protect(view.scores, self.recent_tokens, self.sink_tokens)
