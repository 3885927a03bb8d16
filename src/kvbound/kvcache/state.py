"""A paged cache's sequence as plain data (export) and back into a pool (import): to swap a session out of the
pool and back, or to disk (chat/snapshot.py turns it into bytes). The blocks travel exactly as the pool stores
them: quantized codes and scales stay quantized."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from kvbound.errors import KVBudgetExceeded, SnapshotError
from kvbound.kvcache.pool import PER_BLOCK, STORAGE, BlockPool
from kvbound.kvcache.spec import format_bytes
from kvbound.policies import policy_options

if TYPE_CHECKING:
    from kvbound.kvcache.paged import PagedCache

STATE_FORMAT = 1  # layout of export_state(); bump when it changes


@torch.no_grad()  # not inference_mode: the copies handed out must be ordinary tensors
def export_state(cache: "PagedCache") -> dict[str, Any]:
    """What the sequence holds, as plain Python metadata and CPU tensors: its blocks as stored (a float cache's
    partial last block only up to its tokens), the filled part of the residual window, and the per-token
    metadata. Nothing else: its bytes are `nbytes` less the unfilled slots."""
    seq, pool, spec = cache.seq, cache.pool, cache.spec
    n, pooled = seq.n, seq.pooled_tokens
    blocks = {name: t.cpu() for name, t in pool.read_blocks(seq.block_table, pooled).items()} if seq.block_table \
        else {}
    if spec.quantized:
        rest = n - pooled
        blocks["res_k"] = cache.res_k[:, :, :rest].to("cpu", copy=True)  # (L, n_kv, rest, D)
        blocks["res_v"] = cache.res_v[:, :, :rest].to("cpu", copy=True)
    return {
        "format": STATE_FORMAT,
        "spec": asdict(spec),
        "capacity": seq.capacity,
        "evict_fraction": seq.evict_fraction,
        "sliding_window": cache.sliding_window,
        "policy": {"name": seq.policy.name, "options": policy_options(seq.policy)},
        **seq.export_meta(),
        # A block published for prefix sharing (a system prompt) can be re-attached on import.
        "prefix_hashes": [pool.block_hash(b) for b in seq.block_table],
        "blocks": blocks,
    }


@torch.inference_mode()
def import_state(cache: "PagedCache", state: dict[str, Any]) -> None:
    """Take over a sequence from `export_state` on an empty cache: blocks come from its (possibly shared) pool,
    only as many as the sequence holds. Leading blocks of a shared prefix whose data is already published in the
    pool, bit for bit, are re-attached instead of copied. Raises SnapshotError for a state of another KV layout,
    KVBudgetExceeded (pool untouched) when the pool lacks free blocks."""
    check_state(cache, state)
    seq, pool, spec = cache.seq, cache.pool, cache.spec
    n, B = int(state["tokens"]), spec.block_size
    if n > seq.capacity:
        raise KVBudgetExceeded(f"the saved sequence holds {n} tokens and this cache holds {seq.capacity}; "
                               "restore it into a cache with a larger KV budget", needed=n, available=seq.capacity)
    pooled = spec.pooled(n)
    count = spec.blocks_for(pooled)
    data = state["blocks"]
    shared = _published_prefix(pool, state["prefix_hashes"][:count], data, pooled)
    need = count - len(shared)
    if need > pool.free_blocks:
        raise KVBudgetExceeded(
            f"restoring this sequence needs {need} free KV blocks ({format_bytes(need * spec.bytes_per_block)}) "
            f"and the pool has {pool.free_blocks}; offload or close another session, or raise the pool's "
            "budget", needed=need, available=pool.free_blocks)
    pool.retain(shared)
    fresh = pool.allocate(need, after=shared[-1] if shared else None)
    if fresh:
        skip = len(shared)
        first, last = skip * B, pooled  # tokens of the fresh blocks
        part = {name: t[:, :, skip:] if name in PER_BLOCK else t[:, :, first:last]
                for name, t in data.items() if name in STORAGE}
        pool.write_blocks(fresh, part)
        for i, b in enumerate(fresh, start=skip):  # offer them again, as they were offered before export
            if state["prefix_hashes"][i] is not None and (i + 1) * B <= pooled:
                pool.publish_block(state["prefix_hashes"][i], b)
    seq.block_table[:] = shared + fresh
    if spec.quantized:
        rest = n - pooled
        cache.res_k[:, :, :rest] = data["res_k"].to(cache.res_k.device, cache.res_k.dtype)
        cache.res_v[:, :, :rest] = data["res_v"].to(cache.res_v.device, cache.res_v.dtype)
    seq.import_meta(state)


def check_state(cache: "PagedCache", state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SnapshotError(f"this KV state has format {found!r}; this kvbound reads format {STATE_FORMAT}; "
                            "rebuild the session from its messages")
    saved, ours = state["spec"], asdict(cache.spec)
    diff = [f"{k} {saved.get(k)!r} (saved) vs {v!r} (here)" for k, v in ours.items() if saved.get(k) != v]
    if state.get("sliding_window") != cache.sliding_window:
        diff.append(f"sliding_window {state.get('sliding_window')!r} (saved) vs {cache.sliding_window!r} (here)")
    if diff:
        raise SnapshotError(f"this KV state was saved for another model or KV layout: {'; '.join(diff)}; "
                            "restore it with the same model, dtype, --kv-dtype and block size, or rebuild the "
                            "session from its messages")


def _published_prefix(pool: BlockPool, hashes: list[int | None], data: dict[str, torch.Tensor], pooled: int
                      ) -> list[int]:
    """Leading pool blocks already holding, bit for bit, the state's published prefix blocks."""
    found: list[int] = []
    for i, h in enumerate(hashes):
        block = pool.published_block(h) if h is not None and (i + 1) * pool.spec.block_size <= pooled else None
        if block is None or block in found or not pool.block_equals(block, data, i):
            break
        found.append(block)
    return found
