"""The paged KV store of one sequence: writes each step's K/V into the pool blocks of the sequence's table and
attends over them (float or quantized, eager or the native kernel). What the tokens are — positions, segments,
pins, scores, which ones to evict — is the Sequence's (sequence.py); this module applies its choices.

Eviction is per token, uniform across layers and heads (a per-head policy lets each layer and KV head choose
which tokens of a segment it drops, the same number), followed by compaction: kept tokens move to the front
of the sequence's blocks and get contiguous positions 0..n-1; moved keys are re-rotated by their position
change (llama.cpp's K-shift), so RoPE stays consistent and positions never pass the trained context however
long the conversation runs (StreamingLLM assigns positions within the cache the same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvbound.kvcache import decode, state, storage
from kvbound.kvcache.base import DecodePlan, KVCache, attention, step_mask
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.sequence import Receipt, Sequence, SequenceView
from kvbound.kvcache.spec import FLOAT_DTYPES
from kvbound.models.layers import apply_rope, rope_cos_sin
from kvbound.policies.base import Policy

SCORE_QUERIES = 32  # queries of a step whose attention feeds the eviction scores (an observation window)


@dataclass(frozen=True)
class Step:
    """A begun step: `count` new tokens after `start` held ones, the mask (None: all visible), the new tokens'
    float slots, the blocks a native kernel walks, and whether the table is one run of blocks."""

    start: int
    count: int
    mask: torch.Tensor | None
    new_slots: torch.Tensor | None
    blocks: torch.Tensor
    run: bool
    unrotate: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, -sin of the new tokens: their keys before RoPE


class PagedCache(KVCache):
    def __init__(self, pool: BlockPool, capacity: int, inv_freq: torch.Tensor, policy: Policy | None = None,
                 evict_fraction: float = 0.1, sliding_window: int | None = None):
        self.pool, self.spec = pool, pool.spec
        self.inv_freq, self.sliding_window = inv_freq, sliding_window
        self.seq = Sequence(pool.spec, capacity, policy or Policy(), evict_fraction, pool.device)
        self.res_k = self.res_v = None
        if self.spec.quantized:  # full-precision window of the newest, partly filled block
            s = self.spec
            shape = (s.num_layers, s.num_kv_heads, s.block_size, s.head_dim)  # (L, n_kv, B, D)
            self.res_k = torch.zeros(shape, dtype=FLOAT_DTYPES[s.compute_dtype], device=pool.device)
            self.res_v = torch.zeros(shape, dtype=FLOAT_DTYPES[s.compute_dtype], device=pool.device)
        self.step: Step | None = None  # the begun step (read by decode.py)

    # -- what it holds (read-only to everyone else) ---------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.seq.capacity

    @property
    def policy(self) -> Policy:
        return self.seq.policy

    @property
    def num_tokens(self) -> int:
        return self.seq.n

    @property
    def nbytes(self) -> int:
        return self.seq.nbytes

    @property
    def reserved_bytes(self) -> int:
        """What this sequence may hold: its pool (or the shared pool it draws from) and its residual window."""
        return self.pool.nbytes + self.spec.residual_bytes

    @property
    def num_blocks(self) -> int:
        return len(self.seq.block_table)

    @property
    def table(self) -> tuple[int, ...]:
        return tuple(self.seq.block_table)

    @property
    def evicted_total(self) -> int:
        return self.seq.evicted_total

    @property
    def metadata_bytes(self) -> int:
        return self.seq.metadata_bytes

    def view(self) -> SequenceView:
        return self.seq.view()

    def labels(self) -> tuple[int, frozenset[int]]:
        """The segment new tokens get and the pinned segments (to put back after a temporary segment)."""
        return self.seq.segment, frozenset(self.seq.pinned_segments)

    def set_segment(self, segment: int, pinned: set[int] | frozenset[int] | None = None) -> None:
        self.seq.set_segment(segment, set(pinned) if pinned is not None else None)

    def segment_tokens(self, segment: int) -> int:
        return self.seq.segment_tokens(segment)

    def receipt(self) -> Receipt:
        return self.seq.receipt()

    def forget(self, tokens: int) -> None:
        self.seq.forget(tokens)

    # -- the step -------------------------------------------------------------------------------------------------------
    def begin(self, num_tokens: int) -> torch.Tensor:
        seq, T, B = self.seq, num_tokens, self.spec.block_size
        if seq.n + T > seq.capacity:
            self._evict(seq.n + T - seq.capacity)
        start = seq.n
        positions = seq.append(T)
        self._grow(start + T)
        mask = step_mask(positions, seq.positions[: start + T], self.sliding_window)
        table = seq.block_table
        dev = seq.positions.device
        # the blocks the native decode kernel walks: a quantized cache's whole blocks, a float cache's every block
        held = (start + T) // B if self.spec.quantized else -(-(start + T) // B)
        new_slots = None if self.spec.quantized else torch.tensor(
            [table[i // B] * B + i % B for i in range(start, start + T)], dtype=torch.long, device=dev)
        unrotate = None
        if self.policy.key_moments and T > 1:
            cos, sin = rope_cos_sin(positions, self.inv_freq, torch.float32)
            unrotate = cos, -sin
        self.step = Step(start, T, mask, new_slots, torch.tensor(table[:held], dtype=torch.long, device=dev),
                          storage.consecutive(table), unrotate)
        return positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        step, pool = self.step, self.pool
        end = step.start + step.count
        if self.spec.quantized:
            storage.write_quantized(pool, layer, self.seq.block_table, step.start, k[0], v[0], self.res_k[layer],
                                    self.res_v[layer])
        else:
            storage.write_float(pool, layer, step.new_slots, k[0], v[0])
        if step.count == 1 and step.mask is None and (out := decode.attend_native(self, layer, q, end)) is not None:
            return out
        if (self.policy.scores_writes or step.unrotate is not None) and step.count > 1:
            plain = apply_rope(k[0].float(), *step.unrotate) if step.unrotate is not None else None
            self.seq.ingest(layer, q[0], k[0], v[0], plain)  # a policy that scores tokens as they are written
        keys, values = self._read(layer, end, step.run)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)  # (1, n_kv, S, D)
        if self.policy.needs_attention:
            mask = step.mask[-SCORE_QUERIES:] if step.mask is not None else None
            self._observe(layer, q[:, :, -SCORE_QUERIES:], keys, mask)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return attention(q, keys, values, step.mask)

    def _read(self, layer: int, count: int, run: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's first `count` tokens, (n_kv, count, D) each, in the compute dtype for quantized storage."""
        table = self.seq.block_table
        if self.spec.quantized:
            return storage.read_quantized(self.pool, layer, table, count, run, self.res_k[layer], self.res_v[layer])
        return storage.read_float(self.pool, layer, table, count, run)

    def decode_plan(self) -> DecodePlan | None:
        return decode.plan(self)

    def _observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        """This layer's attention logits of the last queries, for the policy's scores."""
        _, H, Tq, D = q.shape
        n_kv = keys.shape[1]
        # In fp32: a bf16 batched matmul compiles a kernel per key count and keeps it (see base.attention).
        qg = q[0].reshape(n_kv, H // n_kv * Tq, D).float()  # query heads grouped by their KV head
        logits = qg @ keys[0].float().transpose(1, 2) / math.sqrt(D)  # (n_kv, G*Tq, S)
        if mask is not None:
            logits = logits.masked_fill(~mask.repeat(H // n_kv, 1)[None], float("-inf"))
        self.observe(layer, logits)

    def observe(self, layer: int, logits: torch.Tensor) -> None:
        """Hand the sequence the softmax of scaled logits (n_kv, queries, S), averaged over heads and queries."""
        attn = torch.softmax(logits.float(), dim=-1).mean(dim=(0, 1))  # (S,)
        self.seq.observe(layer, attn, self.step.count)

    def end(self) -> None:
        step, B = self.step, self.spec.block_size
        if self.spec.quantized:
            self.seq.receipt_log.quantized_tokens += ((step.start + step.count) // B - step.start // B) * B
        self.seq.commit(step.count)
        self.step = None

    # -- blocks ---------------------------------------------------------------------------------------------------------
    def _grow(self, total: int) -> None:
        table = self.seq.block_table
        need = self.spec.blocks_for(self.spec.pooled(total)) - len(table)
        if need > 0:
            table += self.pool.allocate(need, after=table[-1] if table else None)

    def _release_tail(self, total: int) -> None:
        table, keep = self.seq.block_table, self.spec.blocks_for(self.spec.pooled(total))
        if len(table) > keep:
            self.pool.release(table[keep:])
            del table[keep:]

    @torch.inference_mode()
    def rollback(self, num_tokens: int) -> None:
        """Drop the newest `num_tokens` tokens (a failed turn); 0 only abandons a begun step."""
        seq = self.seq
        if self.step is not None:
            self._release_tail(seq.n)
            self.step = None
        if num_tokens <= 0:
            return
        keep = max(0, seq.n - num_tokens)
        if self.spec.quantized and keep < seq.pooled_tokens:
            # The kept tail must move back into the residual window: rebuild from the dequantized tokens.
            self._apply(seq.compact(torch.arange(keep, device=seq.positions.device), reposition=False))
        else:
            seq.truncate(keep)
            self._release_tail(keep)

    def attach_prefix(self, token_ids: list[int]) -> int:
        """On an empty cache, share the pool's blocks that already hold a prefix of `token_ids` (e.g. the same
        system prompt of another session); returns how many tokens are now held without any compute."""
        seq = self.seq
        if seq.n or seq.block_table:
            return 0
        blocks = self.pool.lookup_prefix(token_ids)[: seq.capacity // self.spec.block_size]
        if not blocks:
            return 0
        self.pool.retain(blocks)
        seq.block_table[:] = blocks
        n = len(blocks) * self.spec.block_size
        seq.append(n)
        seq.commit(n)
        return n

    def publish_prefix(self, token_ids: list[int]) -> None:
        """Offer this sequence's full blocks holding `token_ids` (its first tokens) for sharing."""
        full = min(len(token_ids), self.seq.pooled_tokens) // self.spec.block_size
        self.pool.publish_prefix(token_ids[: full * self.spec.block_size], self.seq.block_table[:full])

    def free(self) -> None:
        """Return every block to the pool (the session ended)."""
        self.pool.release(self.seq.block_table)
        self.seq.block_table.clear()
        self.seq.truncate(0)

    # -- eviction -------------------------------------------------------------------------------------------------------
    @torch.inference_mode()  # callers between steps (a chat making room for a summary) run outside the model
    def make_room(self, free_tokens: int) -> None:
        """Evict per policy until at least `free_tokens` slots are free (raises KVBudgetExceeded if it can't)."""
        short = self.seq.n + free_tokens - self.seq.capacity
        if short > 0:
            self._evict(short)

    @torch.inference_mode()
    def drop_segment(self, segment: int) -> int:
        """Remove every token of `segment` (a transient one, e.g. recalled text after its turn): the tokens after
        it move up and are re-rotated, as after an eviction, but no receipt counts them. Returns the tokens dropped."""
        seq = self.seq
        keep = (seq.segments[: seq.n] != segment).nonzero().flatten()
        dropped = seq.n - int(keep.numel())
        if dropped:
            self._apply(seq.compact(keep, reposition=True))
        return dropped

    def _evict(self, needed: int) -> None:
        keys = self._key_layers if self.policy.needs_keys else None
        self._apply(self.seq.choose_eviction(needed, keys))

    def _key_layers(self, plain: bool = False) -> Iterator[torch.Tensor]:
        """Each layer's held keys, (n_kv, n, D) float (dequantized for int8/int4), one layer at a time; `plain`:
        rotated back by their positions (the keys before RoPE)."""
        n, run = self.seq.n, storage.consecutive(self.seq.block_table)
        cos, sin = rope_cos_sin(self.seq.positions[:n], self.inv_freq, torch.float32) if plain else (None, None)
        for layer in range(self.spec.num_layers):
            keys = self._read(layer, n, run)[0][:, :n].float()
            yield apply_rope(keys, cos, -sin) if plain else keys

    def _apply(self, plan) -> None:
        """Move the K/V of the tokens the sequence kept to the front of its blocks, re-rotating moved keys."""
        first, held, K = plan.first, plan.held_before, int(plan.keep.numel())
        cos, sin = rope_cos_sin(plan.delta.flatten(), self.inv_freq, torch.float32)
        D = cos.shape[-1]
        cos, sin = cos.view(*plan.delta.shape, D), sin.view(*plan.delta.shape, D)  # per head: (L, n_kv, K-first, D)
        run = storage.consecutive(self.seq.block_table)
        for layer in range(self.spec.num_layers):
            keys, values = self._read(layer, held, run)
            if plan.heads is None:
                k_keep = apply_rope(keys[:, plan.keep[first:]].float(), cos, sin)  # (n_kv, K-first, D)
                v_keep = values[:, plan.keep[first:]]
            else:  # each KV head gathers its own slots
                slots = plan.heads[layer, :, first:, None].expand(-1, -1, keys.shape[-1])
                k_keep = apply_rope(keys.float().gather(1, slots), cos[layer], sin[layer])
                v_keep = values.gather(1, slots)
            storage.rewrite(self.pool, layer, self.seq.block_table, first, K, k_keep, v_keep,
                            None if self.res_k is None else self.res_k[layer],
                            None if self.res_v is None else self.res_v[layer])
        self._release_tail(K)

    # -- state (swap a sequence out of the pool and back, or to disk: state.py) ---------------------------------------
    def export_state(self) -> dict[str, Any]:
        if self.step is not None:
            raise RuntimeError("a step is in progress; export the cache between steps")
        return state.export_state(self)

    def import_state(self, saved: dict[str, Any]) -> None:
        if self.seq.n or self.seq.block_table or self.step is not None:
            raise RuntimeError("import_state needs an empty cache; free() it first")
        state.import_state(self, saved)
