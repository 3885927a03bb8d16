"""CacheConfig → a PagedCache over its own pool (the budget is the pool), sized by the spec."""

from __future__ import annotations

import torch

from kvbound.config import CacheConfig, ModelConfig
from kvbound.errors import KVBudgetExceeded
from kvbound.kvcache.paged import PagedCache
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.spec import KVSpec, format_bytes, parse_size
from kvbound.policies import make_policy


def cache_spec(model: ModelConfig, cache: CacheConfig, compute_dtype: str) -> KVSpec:
    dtype = compute_dtype if cache.dtype == "auto" else cache.dtype
    return KVSpec.for_model(model, dtype, compute_dtype, cache.block_size)


def cache_capacity(model: ModelConfig, cache: CacheConfig, spec: KVSpec) -> int:
    """Tokens one sequence may hold: the budget's worth, never more than the model's trained context."""
    if cache.tokens is not None:
        tokens = cache.tokens
    elif cache.budget is not None:
        budget = parse_size(cache.budget)
        tokens = spec.tokens_in(budget)
        if tokens < spec.block_size:
            raise KVBudgetExceeded(
                f"a KV budget of {format_bytes(budget)} holds {tokens} tokens; at least one block of "
                f"{spec.block_size} tokens ({format_bytes(spec.bytes_per_block + spec.residual_bytes)}) is needed",
                needed=spec.bytes_per_block + spec.residual_bytes, available=budget)
    else:
        tokens = model.max_context
    return min(tokens, model.max_context)


def reserved_bytes(model: ModelConfig, cache: CacheConfig, compute_dtype: str) -> int:
    """Bytes a cache built from `cache` preallocates: its pool and its residual window (before building it)."""
    spec = cache_spec(model, cache, compute_dtype)
    pooled = cache_capacity(model, cache, spec) - (spec.block_size - 1 if spec.quantized else 0)
    return max(1, spec.blocks_for(max(pooled, 1))) * spec.bytes_per_block + spec.residual_bytes


def build_pool(model: ModelConfig, cache: CacheConfig, compute_dtype: str, device: torch.device | str = "cpu",
               capacity: int | None = None) -> BlockPool:
    """A pool holding the budget's blocks (one sequence's capacity by default)."""
    spec = cache_spec(model, cache, compute_dtype)
    capacity = capacity or cache_capacity(model, cache, spec)
    pooled = capacity - (spec.block_size - 1 if spec.quantized else 0)
    return BlockPool(spec, max(1, spec.blocks_for(max(pooled, 1))), device=device)


def build_cache(model: ModelConfig, cache: CacheConfig, compute_dtype: str, inv_freq: torch.Tensor,
                device: torch.device | str = "cpu", pool: BlockPool | None = None) -> PagedCache:
    """A sequence's cache: over its own pool (the budget is the pool), or over a shared `pool`."""
    spec = cache_spec(model, cache, compute_dtype)
    if pool is not None and pool.spec != spec:
        raise ValueError(f"the shared pool stores {pool.spec.dtype} KV in blocks of {pool.spec.block_size}; "
                         f"this cache asks for {spec.dtype} in blocks of {spec.block_size}")
    if pool is None:
        capacity = cache_capacity(model, cache, spec)
        pool = build_pool(model, cache, compute_dtype, device, capacity)
    else:  # a sequence of a shared pool may hold what the pool holds (its own window beside it)
        capacity = min(model.max_context, pool.num_blocks * spec.block_size + (spec.block_size - 1
                                                                                 if spec.quantized else 0))
        if cache.tokens is not None or cache.budget is not None:
            capacity = min(capacity, cache_capacity(model, cache, spec))
    options = {"sink_tokens": cache.sink_tokens, "recent_turns": cache.recent_turns, **dict(cache.policy_options)}
    policy = make_policy(cache.policy, **options)
    return PagedCache(pool, capacity, inv_freq, policy=policy, evict_fraction=cache.evict_fraction,
                      sliding_window=model.sliding_window)
