"""StreamingLLM-style perplexity: feed a text continuously through a (bounded) cache, never resetting it,
and score every next token. What the cache evicts or quantizes is what the score measures."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvbound.config import CacheConfig
from kvbound.engine.runner import prefill_chunk


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood (nats)
    kv_peak_bytes: int
    capacity_tokens: int
    evicted_tokens: int
    chunk: int
    policy: str
    kv_dtype: str
    elapsed_s: float


def perplexity(llm, text: str, cache: CacheConfig | None = None, chunk: int = 512,
               max_tokens: int | None = None) -> PerplexityResult:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty; give a file with some text to score")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    started = time.perf_counter()
    ids = llm.tokenizer.encode(text, add_special=True)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text is a single token; give more text to score")
    kv = llm.new_cache(cache)
    step = min(prefill_chunk(chunk, kv.capacity, kv.policy.evicts), kv.capacity)
    if not kv.policy.evicts and len(ids) > kv.capacity:
        ids = ids[: kv.capacity]  # without eviction the text is cut to what the cache holds
    total, scored, peak, evicted = 0.0, 0, 0, 0
    try:
        for offset in range(0, len(ids) - 1, step):
            piece = ids[offset:offset + step]
            targets = ids[offset + 1:offset + 1 + len(piece)]
            logits = llm.runner.score(piece, kv)[: len(targets)]  # (T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= float(logp.gather(1, torch.tensor(targets, device=logp.device)[:, None]).sum())
            scored += len(targets)
            peak = max(peak, kv.nbytes)
            evicted += kv.receipt().evicted_tokens
    finally:
        kv.free()
    nll = total / scored
    return PerplexityResult(ppl=math.exp(nll), tokens=scored, nll=nll, kv_peak_bytes=peak, capacity_tokens=kv.capacity,
                            evicted_tokens=evicted, chunk=step, policy=kv.policy.name, kv_dtype=kv.spec.dtype,
                            elapsed_s=time.perf_counter() - started)
