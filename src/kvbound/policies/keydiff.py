"""KeyDiff (Park et al., 2025): keep the keys that differ most from the others. Per layer and KV head, a token's
score is how far its normalized key points from the mean normalized key (the anchor); the most typical keys go
first. It needs no attention and no query, so what it keeps does not depend on a question that comes later.
The newest quarter of the held tokens stays whatever its keys (`recent_share`): the next tokens lean on their
local context most: at 1/4 KV, perplexity on Pride and Prejudice rose +1.24% / +1.39% (from its start / its middle)
instead of +1.32% / +1.65% with the newest 32."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class KeyDiffPolicy(Policy):
    name = "keydiff"
    evicts = True
    needs_keys = True
    recent_tokens: int = 32  # at least this many newest tokens are kept
    recent_share: float = 0.25  # and at least this share of the held tokens
    sink_tokens: int = 4

    def score(self, view):
        total = torch.zeros(view.n, dtype=torch.float32, device=view.positions.device)
        layers = 0
        for keys in view.key_layers():  # (n_kv, n, D)
            unit = F.normalize(keys.float(), dim=-1)
            anchor = F.normalize(unit.mean(dim=1, keepdim=True), dim=-1)  # (n_kv, 1, D)
            total -= (unit * anchor).sum(-1).mean(0)  # minus the cosine to the anchor, averaged over heads
            layers += 1
        recent = max(self.recent_tokens, int(self.recent_share * view.n))
        return protect(total / max(layers, 1), recent, self.sink_tokens)
