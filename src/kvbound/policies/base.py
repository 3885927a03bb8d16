"""The policy contract. A policy is pure: `observe` folds one layer's attention into per-token scores and
returns the new scores, `ingest` scores a step's new tokens once per layer and head from their own q/k/v,
`score` ranks the held tokens of a read-only SequenceView (higher = keep); the shared
`select` picks the lowest-ranked unpinned ones. Neither touches a cache: the Sequence stores the scores and
applies the choice, so each policy is testable alone on hand-made attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvbound.kvcache.sequence import SequenceView

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
    needs_attention = False  # whether `observe` wants each layer's attention (it costs a softmax per layer)
    needs_keys = False  # whether `score` reads the held keys (view.key_layers; read only when evicting)
    per_head = False  # whether each layer and KV head evicts its own tokens (`score_heads`), not all alike
    scores_writes = False  # whether `ingest` scores each multi-token step's new tokens per layer and KV head
    key_moments = False  # whether the sequence keeps the mean and covariance of every key written (view.key_moments)
    recent_turns = 0  # newest whole turns a chat pins besides the current one (while they leave room)
    summarizes = False  # whether a chat writes a pinned note about the turns this policy evicts

    def observe(self, scores: torch.Tensor, attn: torch.Tensor, layer: int, step_tokens: int) -> torch.Tensor:
        """New scores (S,) from the scores so far (S,; new tokens start at 0) and `attn` (S,): one layer's
        attention of the step's last queries on every held token, averaged over heads and queries."""
        return scores

    def score(self, view: "SequenceView") -> torch.Tensor:
        """(n,) float: how much each held token is worth keeping. Default: age (oldest lowest)."""
        return torch.arange(view.n, dtype=torch.float32, device=view.positions.device)

    def ingest(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(n_kv, T): one layer's scores of a step's T new tokens, from their q (H, T, D), keys (RoPE applied) and
        values (n_kv, T, D); the sequence keeps them per layer and head (view.head_scores)."""
        raise NotImplementedError(f"policy '{self.name}' does not score tokens as they are written")

    def score_heads(self, view: "SequenceView") -> torch.Tensor:
        """(L, n_kv, n) float, for a per-head policy: how much each layer and KV head wants to keep each token."""
        raise NotImplementedError(f"policy '{self.name}' scores tokens, not heads")

    def select(self, view: "SequenceView", count: int) -> torch.Tensor:
        """Indices of the `count` lowest-scoring unpinned tokens. Only unpinned tokens compete: a policy's own
        protected tokens (an infinite score) go before a pinned one can, when nothing else is left."""
        free = (~view.pinned).nonzero().flatten()
        return free[torch.topk(self.score(view)[free], count, largest=False).indices]

    def select_heads(self, view: "SequenceView", evicted: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The slots each layer and KV head keeps, (L, n_kv, K) ascending, when `evicted` (n,) bool are the
        tokens `select` chose: every head drops as many tokens of each segment as `select` did, its own lowest
        by `scores` (L, n_kv, n) among that segment's unpinned tokens. Segments, pins and positions stay the
        same slots in every head; only which tokens of a segment fill them differs."""
        L, H, n = scores.shape
        kept = (~evicted).expand(L, H, n).clone()
        for segment in torch.unique(view.segments[evicted]).tolist():
            members = view.segments == segment
            candidates = (members & ~view.pinned).nonzero().flatten()
            count = int((evicted & members).sum())
            lowest = torch.topk(scores[:, :, candidates], count, dim=-1, largest=False).indices
            chosen = torch.ones(L, H, candidates.numel(), dtype=torch.bool, device=kept.device)
            chosen.scatter_(-1, lowest, False)
            kept[:, :, candidates] = chosen
        slots = torch.arange(n, device=kept.device).expand(L, H, n)
        return slots[kept].view(L, H, n - int(evicted.sum()))


def protect(scores: torch.Tensor, recent: int = 0, sinks: int = 0) -> torch.Tensor:
    """A copy of `scores` (tokens on the last dim: (n,), or (L, n_kv, n) per head) that keeps the newest `recent`
    tokens (H2O/SnapKV/TOVA keep a local window) and the first `sinks` tokens (StreamingLLM's attention sinks)
    whatever their score."""
    scores = scores.clone()
    if recent > 0:
        scores[..., -recent:] = float("inf")
    scores[..., :sinks] = float("inf")
    return scores
