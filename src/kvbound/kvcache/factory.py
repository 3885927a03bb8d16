"""CacheConfig → a PagedCache over its own pool (the budget is the pool), sized by the spec."""

from __future__ import annotations

import torch

from kvbound.config import CacheConfig, ModelConfig
from kvbound.errors import KVBudgetExceeded
from kvbound.kvcache.paged import PagedCache
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.spec import KVSpec, format_bytes, parse_size


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


def build_cache(model: ModelConfig, cache: CacheConfig, compute_dtype: str, inv_freq: torch.Tensor,
                device: torch.device | str = "cpu") -> PagedCache:
    from kvbound.policies import make_policy

    spec = cache_spec(model, cache, compute_dtype)
    capacity = cache_capacity(model, cache, spec)
    pooled = capacity - (spec.block_size - 1 if spec.quantized else 0)
    policy = make_policy(cache.policy, sink_tokens=cache.sink_tokens, recent_turns=cache.recent_turns)
    pool = BlockPool(spec, max(1, spec.blocks_for(max(pooled, 1))), device=device)
    return PagedCache(pool, capacity, inv_freq, policy=policy, evict_fraction=cache.evict_fraction)
