"""One sequence's metadata: its block table, per-token positions / segments / scores, pins, and its eviction
choice. No KV tensors live here: the paged store (paged.py) holds them and applies what the sequence decides
(compaction, K-shift). Policies read it only through `view()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvbound.errors import KVBudgetExceeded
from kvbound.kvcache.moments import KeyMoments
from kvbound.kvcache.spec import KVSpec, format_bytes

if TYPE_CHECKING:
    from kvbound.policies.base import Policy

UNLABELED = -1  # segment of tokens fed outside a chat (raw completion, perplexity)


@dataclass
class Receipt:
    """What the cache did during one turn (or any span the caller brackets with `receipt()`)."""

    policy: str
    evicted_tokens: int = 0
    evicted_segments: dict[int, int] = field(default_factory=dict)  # segment → tokens evicted from it
    quantized_tokens: int = 0
    evictions: int = 0  # compaction events
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0


@dataclass(frozen=True)
class SequenceView:
    """What a policy reads: the held tokens' metadata, oldest first (views of the sequence's tensors; a policy
    returns new tensors and never writes these)."""

    positions: torch.Tensor  # (n,) RoPE positions
    segments: torch.Tensor  # (n,) 0 system prompt, k turn k, negative: notes and scratch, -1 unlabeled
    scores: torch.Tensor  # (n,) what the policy's `observe` rule accumulated from attention
    pinned: torch.Tensor  # (n,) bool: never evicted
    # For policies that score keys (needs_keys): each layer's held keys in turn, (n_kv, n, D) float, post-RoPE.
    key_layers: Callable[[], Iterator[torch.Tensor]] | None = None
    head_scores: torch.Tensor | None = None  # (L, n_kv, n): what `ingest` scored; NaN: a token no step scored
    key_moments: KeyMoments | None = None  # every key written in a multi-token step, before RoPE (key_moments)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, once per view: what a policy derives from it and reads twice during one eviction."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def n(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class Compaction:
    """A decided eviction: the kept token indices (ascending), the first index whose K/V moves, and the RoPE
    position change of every kept token from there on (zero when positions are kept)."""

    keep: torch.Tensor  # (K,)
    first: int
    delta: torch.Tensor  # (K - first,), or (L, n_kv, K - first) with `heads`
    held_before: int
    heads: torch.Tensor | None = None  # (L, n_kv, K): the slots each layer and KV head keeps (per-head eviction)


class Sequence:
    def __init__(self, spec: KVSpec, capacity: int, policy: "Policy", evict_fraction: float = 0.1,
                 device: torch.device | str = "cpu"):
        self.spec, self.capacity, self.policy = spec, capacity, policy
        self.evict_fraction = evict_fraction
        self.block_table: list[int] = []
        self.n = 0  # committed tokens
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.segments = torch.full((capacity,), UNLABELED, dtype=torch.long, device=device)
        self.scores = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.head_scores = torch.zeros(spec.num_layers, spec.num_kv_heads, capacity, dtype=torch.float32,
                                       device=device) if policy.scores_writes else None
        self.key_moments = KeyMoments.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim, device) \
            if policy.key_moments else None
        self.pinned_segments: set[int] = set()
        self.segment = UNLABELED
        self.next_position = 0
        self.evicted_total = 0
        self.receipt_log = Receipt(policy=self.policy.name)

    # -- accounting ---------------------------------------------------------------------------------------------
    @property
    def pooled_tokens(self) -> int:
        """Tokens in pool blocks (a quantized cache keeps the newest partial block in its residual window)."""
        return self.spec.pooled(self.n)

    @property
    def nbytes(self) -> int:
        """Bytes this sequence holds: its pool blocks plus its residual window."""
        return len(self.block_table) * self.spec.bytes_per_block + self.spec.residual_bytes

    @property
    def metadata_bytes(self) -> int:
        tensors = sum(t.nbytes for t in (self.positions, self.segments, self.scores, self.head_scores) if t is not None)
        return tensors + (self.key_moments.nbytes if self.key_moments is not None else 0)

    def receipt(self) -> Receipt:
        """Return the receipt since the last call and start a new one."""
        done, self.receipt_log = self.receipt_log, Receipt(policy=self.receipt_log.policy)
        done.kv_bytes_after = self.receipt_log.kv_bytes_before = self.nbytes
        return done

    # -- segments -----------------------------------------------------------------------------------------------
    def set_segment(self, segment: int, pinned: set[int] | None = None) -> None:
        """Label the tokens fed from now on; `pinned` segments are never evicted."""
        self.segment = segment
        if pinned is not None:
            self.pinned_segments = set(pinned)

    def segment_tokens(self, segment: int) -> int:
        return int((self.segments[: self.n] == segment).sum())

    def pinned_mask(self) -> torch.Tensor:
        seg = self.segments[: self.n]
        return torch.isin(seg, torch.tensor(sorted(self.pinned_segments), dtype=seg.dtype, device=seg.device))

    def view(self, key_layers: Callable[[], Iterator[torch.Tensor]] | None = None) -> SequenceView:
        n = self.n
        heads = None if self.head_scores is None else self.head_scores[..., :n]
        return SequenceView(self.positions[:n], self.segments[:n], self.scores[:n], self.pinned_mask(), key_layers,
                            heads, self.key_moments)

    # -- steps ----------------------------------------------------------------------------------------------------
    def append(self, num_tokens: int) -> torch.Tensor:
        """Label the next `num_tokens` slots (not committed until `commit`); returns their positions (T,)."""
        start, T = self.n, num_tokens
        positions = torch.arange(self.next_position, self.next_position + T, device=self.positions.device)
        self.positions[start:start + T] = positions
        self.segments[start:start + T] = self.segment
        self.scores[start:start + T] = 0.0
        if self.head_scores is not None:
            self.head_scores[..., start:start + T] = float("nan")  # until a multi-token step scores them
        return positions

    def commit(self, num_tokens: int) -> None:
        self.n += num_tokens
        self.next_position += num_tokens

    def truncate(self, keep: int) -> None:
        """Forget every token after the first `keep` (their positions come free again)."""
        self.n = keep
        self.next_position = int(self.positions[keep - 1]) + 1 if keep else 0

    def observe(self, layer: int, attn: torch.Tensor, step_tokens: int) -> None:
        """attn (S,): one layer's attention of the step's last queries on the S held tokens, averaged over heads;
        the policy's rule turns it and the scores so far into the new scores."""
        S = attn.numel()
        self.scores[:S] = self.policy.observe(self.scores[:S], attn, layer, step_tokens)

    def ingest(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               plain: torch.Tensor | None = None) -> None:
        """One layer's q (H, T, D) and k / v (n_kv, T, D) of the step's T new tokens (appended, not yet
        committed), and `plain`, the keys before RoPE: the policy scores them per head, and the key moments take
        them in. Single-token steps (decode, often on a native kernel that never hands over q/k/v) are neither
        scored (their NaN reads as the held tokens' mean) nor counted in the moments."""
        T = k.shape[1]
        if self.head_scores is not None:
            self.head_scores[layer, :, self.n:self.n + T] = self.policy.ingest(q, k, v)
        if self.key_moments is not None and plain is not None:
            self.key_moments.add(layer, plain)

    # -- eviction ----------------------------------------------------------------------------------------------------
    def choose_eviction(self, needed: int, key_layers: Callable[[], Iterator[torch.Tensor]] | None = None
                        ) -> Compaction:
        """Pick at least `needed` unpinned tokens to evict (more, up to evict_fraction of the capacity, so a
        compaction is not paid every step), record them, and relabel what stays: kept tokens move to the front
        with positions 0..K-1. Raises KVBudgetExceeded, changing nothing, when the policy cannot free enough.
        `key_layers` reads the held keys, for a policy that scores them."""
        view, policy = self.view(key_layers), self.policy
        evictable = int((~view.pinned).sum())
        if not policy.evicts or evictable < needed:
            why = (f"policy '{policy.name}' does not evict" if not policy.evicts else
                   f"only {evictable} tokens may be evicted (the rest are pinned: system prompt, current message)")
            raise KVBudgetExceeded(
                f"the KV budget holds {self.capacity} tokens ({format_bytes(self.spec.bytes_for(self.capacity))}); "
                f"{self.n} are held and this step needs {needed} more; {why}. Raise --kv-budget, choose an "
                "evicting --policy (window, h2o, snapkv, tova, keydiff, compactor, turns) or send a shorter message",
                needed=self.n + needed, available=self.capacity)
        target = min(evictable, max(needed, int(self.capacity * self.evict_fraction)))
        victims = policy.select(view, target)
        keep = torch.ones(self.n, dtype=torch.bool, device=view.pinned.device)
        keep[victims] = False
        if bool((view.pinned & ~keep).any()):  # a policy bug must never drop a pinned token
            raise RuntimeError(f"policy '{policy.name}' selected pinned tokens for eviction")
        heads = policy.select_heads(view, ~keep, policy.score_heads(view)) if policy.per_head else None
        log = self.receipt_log
        for s, c in zip(*torch.unique(view.segments[~keep], return_counts=True)):
            log.evicted_segments[int(s)] = log.evicted_segments.get(int(s), 0) + int(c)
        dropped = int((~keep).sum())
        log.evicted_tokens += dropped
        log.evictions += 1
        self.evicted_total += dropped
        return self.compact(keep.nonzero().flatten(), reposition=True, heads=heads)

    def compact(self, keep: torch.Tensor, reposition: bool, heads: torch.Tensor | None = None) -> Compaction:
        """Keep tokens `keep` (ascending) at the front, with positions 0..K-1 if `reposition`. Tokens before the
        first one that moves stay where they are (often the pinned system prompt); a quantized store rewrites
        whole blocks, so `first` is rounded down to a block. With `heads` (L, n_kv, K), each layer and KV head
        keeps its own slots (the same count of each segment as `keep`, so the metadata follows `keep`)."""
        if heads is not None and not reposition:
            raise ValueError("a per-head compaction repositions the kept tokens")
        K, held = int(keep.numel()), self.n
        slots = torch.arange(K, device=keep.device)
        old = self.positions[keep if heads is None else heads]
        new = slots if reposition else old.clone()
        moved = ((keep if heads is None else heads) != slots) | (new != old)
        if heads is not None:
            moved = moved.flatten(0, 1).any(0)  # a slot moves if it moves in any head
        first = int(moved.nonzero()[0]) if bool(moved.any()) else K
        if self.spec.quantized:
            first = (first // self.spec.block_size) * self.spec.block_size
        for meta in (self.segments, self.scores):
            meta[:K] = meta[keep].clone()
        if self.head_scores is not None:
            held_scores = self.head_scores[..., :held]
            self.head_scores[..., :K] = (held_scores[..., keep] if heads is None else
                                         held_scores.gather(-1, heads)).clone()
        self.positions[:K] = new  # per head too: a per-head compaction repositions, so `new` is 0..K-1
        self.n = K
        self.next_position = int(new[-1]) + 1 if K else 0
        return Compaction(keep, first, (new - old)[..., first:], held, heads)

    def forget(self, tokens: int) -> None:
        """Count tokens that left the conversation without passing through the cache (a rebuild that fed only
        the newest turns), so a later turn does not try to feed them again."""
        self.evicted_total += tokens

    # -- state ------------------------------------------------------------------------------------------------------
    def export_meta(self) -> dict[str, Any]:
        n = self.n
        return {
            "tokens": n, "next_position": self.next_position, "evicted_total": self.evicted_total,
            "segment": self.segment, "pinned_segments": sorted(self.pinned_segments),
            "positions": self.positions[:n].to("cpu", torch.int32),  # (n,); int32: 12 bytes a token in all
            "segments": self.segments[:n].to("cpu", torch.int32),
            "scores": self.scores[:n].to("cpu", copy=True),
            **({} if self.head_scores is None else {"head_scores": self.head_scores[..., :n].to("cpu", copy=True)}),
            **({} if self.key_moments is None else {"key_moments": self.key_moments.export()}),
        }

    def import_meta(self, state: dict[str, Any]) -> None:
        n, dev = int(state["tokens"]), self.positions.device
        self.positions[:n] = state["positions"].to(dev)
        self.segments[:n] = state["segments"].to(dev)
        self.scores[:n] = state["scores"].to(dev)
        if self.head_scores is not None and "head_scores" in state:
            self.head_scores[..., :n] = state["head_scores"].to(dev)
        if self.key_moments is not None and "key_moments" in state:
            self.key_moments.load(state["key_moments"])
        self.n, self.next_position = n, int(state["next_position"])
        self.evicted_total = int(state["evicted_total"])
        self.segment = int(state["segment"])
        self.pinned_segments = {int(s) for s in state["pinned_segments"]}
