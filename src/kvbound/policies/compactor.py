"""Compactor (Chari & Van Durme, 2025): keep the tokens that are geometrically unusual or that the tokens around
them attend to, judged without any query. Each layer and KV head scores a token by two signals:
- the non-causal attention it receives from every query of its tile (`tile` tokens of the step that wrote it;
  later queries vote too, so nothing waits for a question), times its value's norm, averaged with its two
  neighbours: computed once, when the token is written (`ingest`), and kept per head (a decoded token, written
  alone, counts as its head's mean);
- the statistical leverage of its key before RoPE among the held keys (how far outside their span it points):
  computed when the cache evicts.
Both are z-scored per layer over the held tokens; a head's score is `blending` × leverage + attention, and every
layer and KV head keeps its own best tokens (per_head), as kvpress's CompactorPress does.

kvpress scores a whole prompt at once with the full cache in memory; here the prompt streams through a bounded
cache in chunks, which is why both signals are normalized over the held tokens at each eviction rather than over
the step that wrote them: on the Austen passkey cases (1/4 KV) per-step normalization found 0 of 9 keys, this
finds 5. kvpress sketches the keys with a random projection first; this computes the leverage exactly (head
dims of 64-128 make that cheap), so it is deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbound.policies.base import Policy, protect, register


@register
@dataclass
class CompactorPolicy(Policy):
    name = "compactor"
    evicts = True
    needs_keys = True
    scores_writes = True
    per_head = True
    tile: int = 256
    blending: float = 0.75
    recent_tokens: int = 32
    sink_tokens: int = 8

    def ingest(self, q, k, v):
        return tile_attention(q, k, v, self.tile)

    def score_heads(self, view):
        def compute() -> torch.Tensor:
            rows = [self.blending * _zscore(leverage(keys)) + _zscore(_unscored_as_mean(received))
                    for keys, received in zip(view.key_layers(plain=True), view.head_scores)]
            return protect(torch.stack(rows), self.recent_tokens, self.sink_tokens)  # (L, n_kv, n)
        return view.memo("compactor", compute)  # `score` and the heads' choice read it once per eviction

    def score(self, view):
        return self.score_heads(view).mean(dim=(0, 1))


def leverage(keys: torch.Tensor) -> torch.Tensor:
    """(n_kv, n, D) → (n_kv, n): each key's leverage among the centred keys, diag(X (XᵀX + λI)⁻¹ Xᵀ), with a
    small ridge λ (1% of the mean diagonal of XᵀX) so a rank-deficient set of keys still solves."""
    x = keys.float() - keys.float().mean(dim=1, keepdim=True)
    gram = x.transpose(1, 2) @ x
    ridge = 1e-2 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-6)[:, None, None]
    chol = torch.linalg.cholesky(gram + ridge * torch.eye(x.shape[-1], device=x.device))
    solved = torch.cholesky_solve(x.transpose(1, 2), chol)  # (n_kv, D, n)
    return (x * solved.transpose(1, 2)).sum(-1).clamp_min(0)


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int) -> torch.Tensor:
    """(n_kv, T): the attention each of T keys receives from every query of its tile, no causal mask, summed
    over the tile's queries and averaged over the query heads of its KV head; times the value's norm, averaged
    with its two neighbours. q (H, T, D), k and v (n_kv, T, D), RoPE applied to q and k."""
    H, T, D = q.shape
    n_kv = k.shape[0]
    received = torch.empty(n_kv, T, dtype=torch.float32, device=k.device)
    for start in range(0, T, tile):
        end = min(T, start + tile)
        grouped = q[:, start:end].float().reshape(n_kv, H // n_kv * (end - start), D)
        logits = grouped @ k[:, start:end].float().transpose(1, 2) / D ** 0.5  # (n_kv, G*t, t)
        received[:, start:end] = torch.softmax(logits, dim=-1).sum(1) / (H // n_kv)
    weighted = received * v.float().norm(dim=-1)
    return F.avg_pool1d(weighted[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _unscored_as_mean(received: torch.Tensor) -> torch.Tensor:
    """(n_kv, n) with NaN where no multi-token step scored a token (decoded tokens): those get their head's mean."""
    unscored = received.isnan()
    if not bool(unscored.any()):
        return received
    mean = received.nanmean(dim=-1, keepdim=True).nan_to_num(0.0)
    return torch.where(unscored, mean, received)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6) if x.numel() > 1 else torch.zeros_like(x)
