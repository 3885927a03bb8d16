"""One sequence's view of the block pool: its block table, per-token metadata (positions, segments, pins,
scores), the full-precision residual window of quantized caches, and attention over what it holds.

Eviction is per token, uniform across layers and heads, followed by compaction: kept tokens move to the
front of the sequence's blocks and get contiguous positions 0..n-1; moved keys are re-rotated by their
position change (llama.cpp's K-shift), so RoPE stays consistent and positions never pass the trained
context however long the conversation runs (StreamingLLM assigns positions within the cache the same way).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import torch

from kvbound.errors import KVBudgetExceeded, SnapshotError
from kvbound.kvcache import native, quant
from kvbound.kvcache.base import DecodePlan, KVCache, attention, step_mask
from kvbound.kvcache.pool import PER_BLOCK, STORAGE, BlockPool
from kvbound.kvcache.spec import FLOAT_DTYPES, format_bytes
from kvbound.models.layers import apply_rope, rope_cos_sin

UNLABELED = -1  # segment of tokens fed outside a chat (raw completion, perplexity)
SCORE_QUERIES = 32  # queries of a step whose attention feeds the eviction scores (an observation window)
STATE_FORMAT = 1  # layout of export_state(); bump when it changes


def policy_options(policy: Any) -> dict[str, Any]:
    """The scalar settings of a policy and of the policy it wraps (sink_tokens, recent_turns, ...), so
    `make_policy(name, **options)` rebuilds it."""
    options: dict[str, Any] = {}
    for obj in (getattr(policy, "inner", None), policy):
        if is_dataclass(obj):
            options.update({f.name: getattr(obj, f.name) for f in fields(obj)
                            if type(getattr(obj, f.name)) in (int, float)})  # not bools: `summarize` is the name
    return options


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


class PagedCache(KVCache):
    def __init__(self, pool: BlockPool, capacity: int, inv_freq: torch.Tensor, policy=None,
                 evict_fraction: float = 0.1, sliding_window: int | None = None):
        spec = pool.spec
        self.pool, self.spec, self.policy = pool, spec, policy
        self.capacity = capacity  # tokens this sequence may hold
        self.inv_freq = inv_freq
        self.evict_fraction = evict_fraction
        self.sliding_window = sliding_window
        self.block = spec.block_size
        dev = pool.device
        self.table: list[int] = []
        self.n = 0
        self.positions = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.segments = torch.full((capacity,), UNLABELED, dtype=torch.long, device=dev)
        self.scores = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.pinned_segments: set[int] = set()
        self.segment = UNLABELED
        self.next_position = 0
        self.compute_dtype = FLOAT_DTYPES[spec.compute_dtype]
        if spec.quantized:  # full-precision window of the newest, partly filled block
            shape = (spec.num_layers, spec.num_kv_heads, self.block, spec.head_dim)  # (L, n_kv, B, D)
            self.res_k = torch.zeros(shape, dtype=self.compute_dtype, device=dev)
            self.res_v = torch.zeros(shape, dtype=self.compute_dtype, device=dev)
        self.receipt_log = Receipt(policy=getattr(policy, "name", "none"))
        self.evicted_total = 0
        self._step = None
        self._contiguous_table = True
        self._step_blocks: torch.Tensor | None = None

    # -- accounting ---------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.n

    @property
    def pooled_tokens(self) -> int:
        """Tokens in pool blocks (quantized caches keep the newest partial block in the residual window)."""
        return (self.n // self.block) * self.block if self.spec.quantized else self.n

    @property
    def nbytes(self) -> int:
        """Bytes this sequence holds: its pool blocks plus its residual window."""
        own = len(self.table) * self.spec.bytes_per_block
        return own + (self.res_k.nbytes + self.res_v.nbytes if self.spec.quantized else 0)

    def receipt(self) -> Receipt:
        """Return the receipt since the last call and start a new one."""
        done, self.receipt_log = self.receipt_log, Receipt(policy=self.receipt_log.policy)
        done.kv_bytes_after = self.nbytes
        self.receipt_log.kv_bytes_before = self.nbytes
        return done

    # -- segments (chat turns) ------------------------------------------------------------------------------------
    def set_segment(self, segment: int, pinned: set[int] | None = None) -> None:
        """Label the tokens fed from now on; `pinned` segments are never evicted."""
        self.segment = segment
        if pinned is not None:
            self.pinned_segments = set(pinned)

    def segment_tokens(self, segment: int) -> int:
        return int((self.segments[: self.n] == segment).sum())

    def pinned_mask(self) -> torch.Tensor:
        seg = self.segments[: self.n]
        mask = torch.zeros(self.n, dtype=torch.bool, device=seg.device)
        for s in self.pinned_segments:
            mask |= seg == s
        return mask

    # -- the step ---------------------------------------------------------------------------------------------------
    def begin(self, num_tokens: int) -> torch.Tensor:
        T = num_tokens
        if self.n + T > self.capacity:
            self._make_room(self.n + T - self.capacity)
        start = self.n
        positions = torch.arange(self.next_position, self.next_position + T, device=self.positions.device)
        self.positions[start:start + T] = positions
        self.segments[start:start + T] = self.segment
        self.scores[start:start + T] = 0.0
        new_blocks = self._grow(start + T)
        mask = step_mask(positions, self.positions[: start + T], self.sliding_window)
        # Where the new tokens go, and how the held ones are read: one view when the table is consecutive
        # (the common single-session case), else a gather list. Decided once per step, not per layer.
        self._contiguous_table = self._contiguous()
        new_slots = None
        B = self.block
        # the blocks the native decode kernel walks: a quantized cache's whole blocks, a float cache's every block
        held = (start + T) // B if self.spec.quantized else -(-(start + T) // B)
        self._step_blocks = torch.tensor(self.table[:held], dtype=torch.long, device=self.positions.device)
        if not self.spec.quantized:
            new_slots = torch.tensor([self.table[i // B] * B + i % B for i in range(start, start + T)],
                                     dtype=torch.long, device=self.positions.device)
        self._step = (start, T, mask, new_slots, new_blocks)
        return positions

    def _grow(self, total: int) -> list[int]:
        pooled = total if not self.spec.quantized else (total // self.block) * self.block
        need = self.spec.blocks_for(pooled) - len(self.table)
        if need <= 0:
            return []
        ids = self.pool.allocate(need, after=self.table[-1] if self.table else None)
        self.table += ids
        return ids

    def _slots(self, count: int) -> torch.Tensor:
        """Pool slot of each of the first `count` tokens, in sequence order."""
        table = torch.tensor(self.table, dtype=torch.long, device=self.positions.device)
        offsets = torch.arange(self.block, device=table.device)
        return (table[:, None] * self.block + offsets[None, :]).flatten()[:count]

    def _contiguous(self) -> bool:
        return all(b == self.table[0] + i for i, b in enumerate(self.table))

    def _consecutive(self) -> bool:
        """Whether the table is one run of blocks (reads are views); cached for the layers of a step."""
        return self._contiguous_table if self._step is not None else self._contiguous()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, T, mask, new_slots, _ = self._step
        end = start + T
        if self.spec.quantized:
            self._write_quantized(layer, start, k[0], v[0])
            if T == 1 and mask is None and (out := self._decode_native(layer, q, end)) is not None:
                return out
            keys, values = self._read_layer(layer, end)
        else:
            self.pool.k[layer].index_copy_(1, new_slots, k[0].to(self.pool.k.dtype))
            self.pool.v[layer].index_copy_(1, new_slots, v[0].to(self.pool.v.dtype))
            if T == 1 and mask is None and (out := self._decode_native(layer, q, end)) is not None:
                return out
            keys, values = self._read_float(layer, end)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)  # (1, n_kv, S, D)
        if self.policy is not None and self.policy.needs_attention:
            self._observe(layer, q[:, :, -SCORE_QUERIES:], keys, mask[-SCORE_QUERIES:] if mask is not None else None)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return attention(q, keys, values, mask)

    def _decode_native(self, layer: int, q: torch.Tensor, count: int) -> torch.Tensor | None:
        """A single-query step with the native kernel, reading the blocks in place (None: use the eager path)."""
        pool, spec = self.pool, self.spec
        observe = self.policy is not None and self.policy.needs_attention
        if spec.quantized:
            rest = count - self._step_blocks.numel() * self.block
            done = native.decode_attention(
                q[0, :, 0], pool.k[layer], pool.k_scale[layer], pool.k_zero[layer], pool.v[layer],
                pool.v_scale[layer], pool.v_zero[layer], block=self.block, group=spec.group, bits=spec.bits,
                table=self._step_blocks, res_k=self.res_k[layer, :, :rest], res_v=self.res_v[layer, :, :rest],
                with_scores=observe)
        else:
            done = native.decode_attention_float(q[0, :, 0], pool.k[layer], pool.v[layer], block=self.block,
                                                 table=self._step_blocks, held=count, with_scores=observe)
        if done is None:
            return None
        out, logits = done
        if observe:
            self._observe_logits(layer, logits)
        return out.view(1, -1, 1, q.shape[-1])

    def decode_plan(self) -> DecodePlan | None:
        """The begun step as a native whole-model step sees it, when it is one token on the CPU with nothing masked;
        None otherwise. A quantized cache's token goes into the residual window; the step that fills a block runs
        eagerly (it quantizes the block)."""
        if self._step is None or self.pool.device.type != "cpu":
            return None
        start, T, mask, new_slots, _ = self._step
        if T != 1 or mask is not None:
            return None
        pool, observe = self.pool, self.policy is not None and self.policy.needs_attention
        if not self.spec.quantized:
            return DecodePlan(pool.k, pool.v, self.block, int(new_slots[0]), self._step_blocks, start + 1, observe)
        rest = start % self.block
        if rest + 1 >= self.block:
            return None
        return DecodePlan(pool.k, pool.v, self.block, -1, self._step_blocks, start + 1, observe, pool.k_scale,
                          pool.k_zero, pool.v_scale, pool.v_zero, self.spec.bits, self.spec.group, self.res_k,
                          self.res_v, rest)

    def observe(self, layer: int, logits: torch.Tensor) -> None:
        self._observe_logits(layer, logits)

    def end(self) -> None:
        start, T, _, _, _ = self._step
        if self.spec.quantized:
            before = start // self.block
            self.receipt_log.quantized_tokens += ((start + T) // self.block - before) * self.block
        self.n = start + T
        self.next_position += T
        self._step = None

    @torch.inference_mode()
    def rollback(self, num_tokens: int) -> None:
        """Drop the newest `num_tokens` tokens (a failed turn); 0 only abandons a begun step."""
        if self._step is not None:
            self._release_tail(self.n)
            self._step = None
        if num_tokens <= 0:
            return
        keep = max(0, self.n - num_tokens)
        if self.spec.quantized and keep < self.pooled_tokens:
            # The kept tail must move back into the residual window: rebuild from the dequantized tokens.
            self._compact(torch.arange(keep, device=self.positions.device), reposition=False)
        else:
            self.n = keep
            self._release_tail(keep)
        self.next_position = int(self.positions[keep - 1]) + 1 if keep else 0

    def _release_tail(self, total: int) -> None:
        pooled = total if not self.spec.quantized else (total // self.block) * self.block
        keep_blocks = self.spec.blocks_for(pooled)
        if len(self.table) > keep_blocks:
            self.pool.release(self.table[keep_blocks:])
            del self.table[keep_blocks:]

    def attach_prefix(self, token_ids: list[int]) -> int:
        """On an empty cache, share the pool's blocks that already hold a prefix of `token_ids` (e.g. the same
        system prompt of another session); returns how many tokens are now held without any compute."""
        if self.n or self.table:
            return 0
        blocks = self.pool.lookup_prefix(token_ids)[: (self.capacity // self.block)]
        if not blocks:
            return 0
        self.pool.retain(blocks)
        n = len(blocks) * self.block
        self.table = list(blocks)
        self.positions[:n] = torch.arange(n, device=self.positions.device)
        self.segments[:n] = self.segment
        self.scores[:n] = 0.0
        self.n = self.next_position = n
        return n

    def publish_prefix(self, token_ids: list[int]) -> None:
        """Offer this sequence's full blocks holding `token_ids` (its first tokens) for sharing."""
        full = min(len(token_ids), self.pooled_tokens) // self.block
        self.pool.publish_prefix(token_ids[: full * self.block], self.table[:full])

    def free(self) -> None:
        """Return every block to the pool (the session ended)."""
        self.pool.release(self.table)
        self.table, self.n, self.next_position = [], 0, 0

    # -- state export / import (swap a sequence out of the pool and back, or to disk) -----------------------------
    @torch.no_grad()  # not inference_mode: the copies handed out must be ordinary tensors
    def export_state(self) -> dict[str, Any]:
        """What this sequence holds, as plain Python metadata and CPU tensors: its blocks exactly as the pool
        stores them (quantized codes and scales stay quantized; a float cache's partial last block only up to
        its n tokens), the filled part of the residual window, and the per-token metadata. Nothing else: its
        bytes are `nbytes` less the unfilled slots."""
        if self._step is not None:
            raise RuntimeError("a step is in progress; export the cache between steps")
        n, pooled, spec = self.n, self.pooled_tokens, self.spec
        blocks = {name: t.cpu() for name, t in self.pool.read_blocks(self.table, pooled).items()} if self.table \
            else {}
        if spec.quantized:
            rest = n - pooled
            blocks["res_k"] = self.res_k[:, :, :rest].to("cpu", copy=True)  # (L, n_kv, rest, D)
            blocks["res_v"] = self.res_v[:, :, :rest].to("cpu", copy=True)
        return {
            "format": STATE_FORMAT,
            "spec": asdict(spec),
            "capacity": self.capacity,
            "evict_fraction": self.evict_fraction,
            "sliding_window": self.sliding_window,
            "policy": {"name": getattr(self.policy, "name", "none"), "options": policy_options(self.policy)},
            "tokens": n,
            "next_position": self.next_position,
            "evicted_total": self.evicted_total,
            "segment": self.segment,
            "pinned_segments": sorted(self.pinned_segments),
            "positions": self.positions[:n].to("cpu", torch.int32),  # (n,); int32: 12 bytes a token in all
            "segments": self.segments[:n].to("cpu", torch.int32),
            "scores": self.scores[:n].to("cpu", copy=True),
            # A block published for prefix sharing (a system prompt) can be re-attached on import.
            "prefix_hashes": [self.pool.block_hash(b) for b in self.table],
            "blocks": blocks,
        }

    @torch.inference_mode()
    def import_state(self, state: dict[str, Any]) -> None:
        """Take over a sequence from `export_state` on this empty cache: blocks come from this cache's (possibly
        shared) pool, only as many as the sequence holds. Leading blocks of a shared prefix whose data is
        already published in the pool, bit for bit, are re-attached instead of copied. Raises SnapshotError for
        a state of another KV layout, KVBudgetExceeded (pool untouched) when the pool lacks free blocks."""
        if self.n or self.table or self._step is not None:
            raise RuntimeError("import_state needs an empty cache; free() it first")
        self._check_state(state)
        n, spec, B = int(state["tokens"]), self.spec, self.block
        if n > self.capacity:
            raise KVBudgetExceeded(f"the saved sequence holds {n} tokens and this cache holds {self.capacity}; "
                                   "restore it into a cache with a larger KV budget", needed=n, available=self.capacity)
        pooled = (n // B) * B if spec.quantized else n
        count = spec.blocks_for(pooled)
        data = state["blocks"]
        shared = self._published_prefix(state["prefix_hashes"][:count], data, pooled)
        need = count - len(shared)
        if need > self.pool.free_blocks:
            raise KVBudgetExceeded(
                f"restoring this sequence needs {need} free KV blocks ({format_bytes(need * spec.bytes_per_block)}) "
                f"and the pool has {self.pool.free_blocks}; offload or close another session, or raise the pool's "
                "budget", needed=need, available=self.pool.free_blocks)
        self.pool.retain(shared)
        fresh = self.pool.allocate(need, after=shared[-1] if shared else None)
        if fresh:
            skip = len(shared)
            first, last = skip * B, pooled  # tokens of the fresh blocks
            part = {name: t[:, :, skip:] if name in PER_BLOCK else t[:, :, first:last]
                    for name, t in data.items() if name in STORAGE}
            self.pool.write_blocks(fresh, part)
            for i, b in enumerate(fresh, start=skip):  # offer them again, as they were offered before export
                if state["prefix_hashes"][i] is not None and (i + 1) * B <= pooled:
                    self.pool.publish_block(state["prefix_hashes"][i], b)
        self.table = shared + fresh
        if spec.quantized:
            rest = n - pooled
            self.res_k[:, :, :rest] = data["res_k"].to(self.res_k.device, self.res_k.dtype)
            self.res_v[:, :, :rest] = data["res_v"].to(self.res_v.device, self.res_v.dtype)
        dev = self.positions.device
        self.positions[:n] = state["positions"].to(dev)
        self.segments[:n] = state["segments"].to(dev)
        self.scores[:n] = state["scores"].to(dev)
        self.n, self.next_position = n, int(state["next_position"])
        self.evicted_total = int(state["evicted_total"])
        self.segment = int(state["segment"])
        self.pinned_segments = {int(s) for s in state["pinned_segments"]}

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise SnapshotError(f"this KV state has format {found!r}; this kvbound reads format {STATE_FORMAT}; "
                                "rebuild the session from its messages")
        saved, ours = state["spec"], asdict(self.spec)
        diff = [f"{k} {saved.get(k)!r} (saved) vs {v!r} (here)" for k, v in ours.items() if saved.get(k) != v]
        if state.get("sliding_window") != self.sliding_window:
            diff.append(f"sliding_window {state.get('sliding_window')!r} (saved) vs {self.sliding_window!r} (here)")
        if diff:
            raise SnapshotError(f"this KV state was saved for another model or KV layout: {'; '.join(diff)}; "
                                "restore it with the same model, dtype, --kv-dtype and block size, or rebuild the "
                                "session from its messages")

    def _published_prefix(self, hashes: list[int | None], data: dict[str, torch.Tensor], pooled: int) -> list[int]:
        """Leading pool blocks already holding, bit for bit, the state's published prefix blocks."""
        found: list[int] = []
        for i, h in enumerate(hashes):
            block = self.pool.published_block(h) if h is not None and (i + 1) * self.block <= pooled else None
            if block is None or block in found or not self.pool.block_equals(block, data, i):
                break
            found.append(block)
        return found

    # -- reading storage ----------------------------------------------------------------------------------------
    def _read_float(self, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._consecutive():
            first = self.table[0] * self.block
            return self.pool.k[layer, :, first:first + count], self.pool.v[layer, :, first:first + count]
        k_out, v_out = self.pool.scratch(count)
        slots = self._slots(count)
        if self.pool.k.dtype == k_out.dtype:  # gather straight into the preallocated scratch
            torch.index_select(self.pool.k[layer], 1, slots, out=k_out)
            torch.index_select(self.pool.v[layer], 1, slots, out=v_out)
        else:
            k_out.copy_(self.pool.k[layer].index_select(1, slots))
            v_out.copy_(self.pool.v[layer].index_select(1, slots))
        return k_out, v_out

    def _read_layer(self, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All `count` held tokens of one layer in the compute dtype (a view or the pool's scratch)."""
        if not self.spec.quantized:
            return self._read_float(layer, count)
        pooled = (count // self.block) * self.block
        k_out, v_out = self.pool.scratch(count)
        if pooled:
            self._dequantize(layer, pooled, k_out[:, :pooled], v_out[:, :pooled])
        rest = count - pooled
        k_out[:, pooled:count] = self.res_k[layer, :, :rest]
        v_out[:, pooled:count] = self.res_v[layer, :, :rest]
        return k_out, v_out

    def _dequantize(self, layer: int, pooled: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        spec, pool = self.spec, self.pool
        nblocks = pooled // self.block
        if self._consecutive():
            first = self.table[0]
            s0, s1 = first * self.block, (first + nblocks) * self.block
            kc, vc = pool.k[layer, :, s0:s1], pool.v[layer, :, s0:s1]
            ks, kz = pool.k_scale[layer, :, first:first + nblocks], pool.k_zero[layer, :, first:first + nblocks]
            vs, vz = pool.v_scale[layer, :, s0:s1], pool.v_zero[layer, :, s0:s1]
        else:
            slots = self._slots(pooled)
            table = torch.tensor(self.table[:nblocks], dtype=torch.long, device=self.positions.device)
            kc, vc = pool.k[layer].index_select(1, slots), pool.v[layer].index_select(1, slots)
            ks, kz = pool.k_scale[layer].index_select(1, table), pool.k_zero[layer].index_select(1, table)
            vs, vz = pool.v_scale[layer].index_select(1, slots), pool.v_zero[layer].index_select(1, slots)
        quant.dequantize_keys(kc, ks, kz, spec.bits, self.block, k_out)
        quant.dequantize_values(vc, vs, vz, spec.bits, spec.group, v_out)

    # -- writing storage -----------------------------------------------------------------------------------------
    def _write_quantized(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k/v (n_kv, T, D): fill the residual window and quantize each block that fills."""
        T = k.shape[1]
        pooled_before = (start // self.block) * self.block
        r = start - pooled_before
        total = start + T
        pooled_after = (total // self.block) * self.block
        if pooled_after > pooled_before:  # whole blocks complete: quantize them from residual + new tokens
            k_all = torch.cat((self.res_k[layer, :, :r], k.to(self.compute_dtype)), dim=1)  # (n_kv, r+T, D)
            v_all = torch.cat((self.res_v[layer, :, :r], v.to(self.compute_dtype)), dim=1)
            first_block = pooled_before // self.block
            for i in range((pooled_after - pooled_before) // self.block):
                blk = self.table[first_block + i]
                self._store_block(layer, blk, k_all[:, i * self.block:(i + 1) * self.block],
                                  v_all[:, i * self.block:(i + 1) * self.block])
            rest = total - pooled_after
            done = pooled_after - pooled_before
            self.res_k[layer, :, :rest] = k_all[:, done:done + rest]
            self.res_v[layer, :, :rest] = v_all[:, done:done + rest]
        else:
            self.res_k[layer, :, r:r + T] = k
            self.res_v[layer, :, r:r + T] = v

    def _store_block(self, layer: int, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pool, spec, B = self.pool, self.spec, self.block
        codes, scale, zero = quant.quantize_keys(k, spec.bits)
        pool.k[layer, :, block * B:(block + 1) * B] = codes
        pool.k_scale[layer, :, block], pool.k_zero[layer, :, block] = scale, zero
        codes, scale, zero = quant.quantize_values(v, spec.bits, spec.group)
        pool.v[layer, :, block * B:(block + 1) * B] = codes
        pool.v_scale[layer, :, block * B:(block + 1) * B] = scale
        pool.v_zero[layer, :, block * B:(block + 1) * B] = zero

    def _write_float_range(self, layer: int, begin: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self._slots(begin + k.shape[1])[begin:]
        self.pool.k[layer].index_copy_(1, slots, k.to(self.pool.k.dtype))
        self.pool.v[layer].index_copy_(1, slots, v.to(self.pool.v.dtype))

    # -- scores for eviction policies ------------------------------------------------------------------------------
    def _observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add this layer's attention (last queries, averaged over heads) to the policy's per-token scores."""
        _, H, Tq, D = q.shape
        n_kv = keys.shape[1]
        # In fp32: a bf16 batched matmul compiles a kernel per key count and keeps it (see base.attention).
        qg = q[0].reshape(n_kv, H // n_kv * Tq, D).float()  # query heads grouped by their KV head
        logits = qg @ keys[0].float().transpose(1, 2) / math.sqrt(D)  # (n_kv, G*Tq, S)
        if mask is not None:
            logits = logits.masked_fill(~mask.repeat(H // n_kv, 1)[None], float("-inf"))
        self._observe_logits(layer, logits)

    def _observe_logits(self, layer: int, logits: torch.Tensor) -> None:
        """Hand the policy the softmax of scaled logits (n_kv, queries, S), averaged over heads and queries."""
        attn = torch.softmax(logits.float(), dim=-1).mean(dim=(0, 1))  # (S,)
        self.policy.observe(self, layer, attn, self._step[1])

    # -- eviction --------------------------------------------------------------------------------------------------
    def make_room(self, free_tokens: int) -> None:
        """Evict per policy until at least `free_tokens` slots are free (raises KVBudgetExceeded if it can't)."""
        short = self.n + free_tokens - self.capacity
        if short > 0:
            self._make_room(short)

    def _make_room(self, needed: int) -> None:
        """Evict at least `needed` unpinned tokens (more, up to evict_fraction of capacity, to amortize)."""
        pinned = self.pinned_mask()
        evictable = int((~pinned).sum())
        name = getattr(self.policy, "name", "none")
        if self.policy is None or not self.policy.evicts or evictable < needed:
            why = (f"policy '{name}' does not evict" if self.policy is None or not self.policy.evicts
                   else f"only {evictable} tokens may be evicted (the rest are pinned: system prompt, current message)")
            raise KVBudgetExceeded(
                f"the KV budget holds {self.capacity} tokens ({format_bytes(self.pool.nbytes)}); "
                f"{self.n} are held and this step needs {needed} more; {why}. Raise --kv-budget, choose an "
                "evicting --policy (window, h2o, snapkv, tova, turns) or send a shorter message",
                needed=self.n + needed, available=self.capacity)
        target = min(evictable, max(needed, int(self.capacity * self.evict_fraction)))
        victims = self.policy.select(self, target, pinned)
        keep = torch.ones(self.n, dtype=torch.bool, device=pinned.device)
        keep[victims] = False
        if bool((keep[pinned] == False).any()):  # noqa: E712 — a policy bug must never drop a pinned token
            raise RuntimeError(f"policy '{name}' selected pinned tokens for eviction")
        segs = self.segments[: self.n][~keep]
        for s, c in zip(*torch.unique(segs, return_counts=True)):
            self.receipt_log.evicted_segments[int(s)] = self.receipt_log.evicted_segments.get(int(s), 0) + int(c)
        self.receipt_log.evicted_tokens += int((~keep).sum())
        self.evicted_total += int((~keep).sum())
        self.receipt_log.evictions += 1
        self._compact(keep.nonzero().flatten(), reposition=True)

    def _compact(self, keep_idx: torch.Tensor, reposition: bool) -> None:
        """Keep tokens `keep_idx` (ascending) at the front; re-rotate keys whose position changes."""
        K = int(keep_idx.numel())
        old_pos = self.positions[keep_idx]
        new_pos = torch.arange(K, device=old_pos.device) if reposition else old_pos.clone()
        # Tokens before the first moved one stay where they are (often the pinned system prompt).
        moved = (keep_idx != torch.arange(K, device=keep_idx.device)) | (new_pos != old_pos)
        first = int(moved.nonzero()[0]) if bool(moved.any()) else K
        delta = (new_pos - old_pos)[first:]
        cos, sin = rope_cos_sin(delta, self.inv_freq, torch.float32)
        count = self.n
        if self.spec.quantized:
            first = (first // self.block) * self.block  # a block is re-quantized whole
            delta = (new_pos - old_pos)[first:]
            cos, sin = rope_cos_sin(delta, self.inv_freq, torch.float32)
        for layer in range(self.spec.num_layers):
            keys, values = self._read_layer(layer, count)
            k_keep = keys[:, keep_idx[first:]].float()  # (n_kv, K-first, D)
            v_keep = values[:, keep_idx[first:]]
            if reposition:
                k_keep = apply_rope(k_keep, cos, sin)
            if self.spec.quantized:
                self._rewrite_quantized(layer, first, K, k_keep, v_keep)
            else:
                self._write_float_range(layer, first, k_keep, v_keep)
        for meta in (self.segments, self.scores):
            meta[:K] = meta[keep_idx].clone()
        self.positions[:K] = new_pos
        self.n = K
        self.next_position = int(new_pos[-1]) + 1 if K else 0
        self._release_tail(K)

    def _rewrite_quantized(self, layer: int, first: int, K: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pooled = (K // self.block) * self.block
        for b in range(first // self.block, pooled // self.block):
            lo = b * self.block - first
            self._store_block(layer, self.table[b], k[:, lo:lo + self.block], v[:, lo:lo + self.block])
        rest = K - max(pooled, first)
        self.res_k[layer, :, :rest] = k[:, k.shape[1] - rest:].to(self.compute_dtype)
        self.res_v[layer, :, :rest] = v[:, v.shape[1] - rest:].to(self.compute_dtype)
