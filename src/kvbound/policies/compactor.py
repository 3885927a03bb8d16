"""Compactor (Chari & Van Durme, 2025): keep the tokens that are geometrically unusual or that the tokens around
them attend to, judged without any query. Each layer and KV head scores a token by two signals:
- the non-causal attention it receives from every query of its tile (`tile` tokens of the step that wrote it;
  later queries vote too, so nothing waits for a question), times its value's norm, averaged over a window of
  `neighbours` tokens around it: computed once, when the token is written (`ingest`), and kept per head (a
  decoded token, written alone, counts as its head's mean);
- the statistical leverage of its key before RoPE: how far outside the span of every key the sequence has written
  it points, x̄ᵀ(Σ + λI)⁻¹x̄ against the running mean and covariance of all of them (kvcache/moments.py, evicted
  ones included), computed when the cache evicts.
Both are z-scored per layer over the held tokens; a head's score is `blending` × leverage + attention, and every
layer and KV head keeps its own best tokens (per_head), as kvpress's CompactorPress does.

kvpress scores a whole prompt at once with the full cache in memory; here the prompt streams through a bounded
cache in chunks, and a token must survive every eviction until the question comes. So the leverage is judged
against the whole text seen so far, not against the held keys, which after a few evictions are the survivors of
earlier rankings: on the Austen passkey dev cases at 1/8 KV that took the keys found from 1 of 9 to 4, and on the
classic cases at 1/4 from 7 of 9 to 9. Both signals are z-scored over the held tokens at each eviction, not over
the step that wrote them (per-step normalization found 0 of 9 Austen keys at 1/4). kvpress sketches the keys with
a random projection first; this computes the leverage exactly (head dims of 64-128 make that cheap), so it is
deterministic.

The window is 7 tokens where kvpress averages 3, as SnapKV pools its votes over 7: a fact is a span (a 5-digit
key is 5 tokens plus the words that name it), and one evicted token of it loses the whole. On 60 passkey cases in
Sense and Sensibility at 1/4 KV (benchmarks/make_passkey.py, seeds 7 and 8; the full cache finds 39) a window
of 3 finds 36 and one of 7 finds 43; on the classic dev cases at 1/8, 6 of 9 and 8 of 9. It costs perplexity
where nothing is a span to keep: +4.6% at 1/4 of 3,584 tokens of Pride and Prejudice against +3.3%
(benchmarks/compression.py, both with a ridge of 1%).

The ridge λ of the leverage is 10% of the mean key variance (`ridge`). kvpress adds almost none and sketches the
keys to 48 of their 64 dimensions at random, which drops some directions the keys barely vary in; the ridge
damps all of them, deterministically. On those 60 dev cases a ridge of 1% finds 43, 10% 46 (3 more, none lost),
30% 46 and 100% 44; the classic and Austen dev sets stay at 9 and 5 at 1/4 (at 1/8 the classic set loses one,
8 → 7). Run once on the held-out draws after that choice, it took compactor from 15 to 17 of 30 at 1/4 and from 8
to 12 at 1/8, and from 18 to 19 of 30 on the second draw; perplexity at 1/4 of 3,584 tokens of Pride and Prejudice
went from +4.6% to +4.1% (benchmarks/compression.py).

On 120 held-out passkey cases at 1/4 (three draws; benchmarks/passkey_after.py) compactor finds 82, kvpress's
CompactorPress, its random sketch drawn per case, 71 and 75 from two seeds, and 81 and 81 with its kept keys
re-rotated to positions 0..K-1 as kvbound stores them: a tie with the latter case by case (docs/memory.md). At 1/8
of the first draw compactor finds 12, CompactorPress 7 and the re-rotated press 12.

What decides a case is whether every head keeps the key's two mentions: with the six tokens before each, its
digits and the token after (about 12 tokens a mention) protected in every head (an oracle: it knows where the key
is), compactor would find 56 of the 60 S&S dev cases (the full cache finds 39), while with a ridge of 1% each head
kept 30-75% of the key's digits. Raising that share is not enough, though. A window of 9 or 11, kvpress's logits
without the 1/√D scale, a blending of 2 (on 8 of the cases, the digits kept went from 50% to 70%) and a blending of
2 with the leverage also max-pooled over the window (the tokens around each mention kept: 37% → 62%) each found 3
to 5 of those 60 keys that compactor with a ridge of 1% missed and lost 4 to 7 that it found (41 to 43 found in
all), so none replaced the settings above; a blending of 1.5 with a ridge of 30% found 46, and, with the ridge of 10%,
adding half the mean score over every layer and head to each head's (so the heads agree more often) 45."""

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
    key_moments = True
    per_head = True
    tile: int = 256
    blending: float = 0.75
    recent_tokens: int = 32
    sink_tokens: int = 8
    neighbours: int = 7  # odd: the window the attention signal is averaged over, centred on the token
    ridge: float = 0.1  # λ of the leverage, as a fraction of the mean key variance

    def __post_init__(self) -> None:
        if self.neighbours < 1 or self.neighbours % 2 == 0:
            raise ValueError(f"compactor's neighbours must be an odd number >= 1, got {self.neighbours}")
        if not self.ridge > 0:
            raise ValueError(f"compactor's ridge must be > 0 (a fraction of the mean key variance), got {self.ridge}")

    def ingest(self, q, k, v):
        return tile_attention(q, k, v, self.tile, self.neighbours)

    def score_heads(self, view):
        def compute() -> torch.Tensor:
            moments = view.key_moments

            def judged(layer: int, keys: torch.Tensor) -> torch.Tensor:
                return leverage(keys, moments.layer(layer) if moments is not None else None, self.ridge)
            rows = [self.blending * _zscore(judged(layer, keys)) + _zscore(_unscored_as_mean(received))
                    for layer, (keys, received) in enumerate(zip(view.key_layers(plain=True), view.head_scores))]
            return protect(torch.stack(rows), self.recent_tokens, self.sink_tokens)  # (L, n_kv, n)
        return view.memo("compactor", compute)  # `score` and the heads' choice read it once per eviction

    def score(self, view):
        return self.score_heads(view).mean(dim=(0, 1))


def leverage(keys: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor] | None, ridge: float) -> torch.Tensor:
    """(n_kv, n, D) → (n_kv, n): each key's leverage x̄ᵀ(Σ + λI)⁻¹x̄ against `reference` (mean (n_kv, D),
    covariance (n_kv, D, D)) of the keys it is judged among; None: the given keys themselves, which makes it
    n × diag(X̄ (X̄ᵀX̄ + nλI)⁻¹ X̄ᵀ). λ is `ridge` × the mean variance: it lets a rank-deficient set solve and keeps
    the directions the keys barely vary in from dominating the score."""
    keys = keys.float()
    if reference is None:
        mean = keys.mean(dim=1)
        centred = keys - mean[:, None]
        reference = mean, centred.transpose(1, 2) @ centred / keys.shape[1]
    mean, cov = reference
    x = keys - mean[:, None]
    lam = ridge * cov.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-6)[:, None, None]
    chol = torch.linalg.cholesky(cov + lam * torch.eye(x.shape[-1], device=x.device))
    solved = torch.cholesky_solve(x.transpose(1, 2), chol)  # (n_kv, D, n)
    return (x * solved.transpose(1, 2)).sum(-1).clamp_min(0)


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int, neighbours: int) -> torch.Tensor:
    """(n_kv, T): the attention each of T keys receives from every query of its tile, no causal mask, summed
    over the tile's queries and averaged over the query heads of its KV head; times the value's norm, averaged
    over the `neighbours` (odd) tokens centred on it. q (H, T, D), k and v (n_kv, T, D), RoPE applied to q and k."""
    H, T, D = q.shape
    n_kv = k.shape[0]
    received = torch.empty(n_kv, T, dtype=torch.float32, device=k.device)
    for start in range(0, T, tile):
        end = min(T, start + tile)
        grouped = q[:, start:end].float().reshape(n_kv, H // n_kv * (end - start), D)
        logits = grouped @ k[:, start:end].float().transpose(1, 2) / D ** 0.5  # (n_kv, G*t, t)
        received[:, start:end] = torch.softmax(logits, dim=-1).sum(1) / (H // n_kv)
    weighted = received * v.float().norm(dim=-1)
    return F.avg_pool1d(weighted[:, None], neighbours, stride=1, padding=neighbours // 2,
                        count_include_pad=False)[:, 0]


def _unscored_as_mean(received: torch.Tensor) -> torch.Tensor:
    """(n_kv, n) with NaN where no multi-token step scored a token (decoded tokens): those get their head's mean."""
    unscored = received.isnan()
    if not bool(unscored.any()):
        return received
    mean = received.nanmean(dim=-1, keepdim=True).nan_to_num(0.0)
    return torch.where(unscored, mean, received)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6) if x.numel() > 1 else torch.zeros_like(x)
