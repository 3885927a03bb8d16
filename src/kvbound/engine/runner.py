"""Prefill (in chunks, so no step sees more than `chunk` queries), single-token decode over a KVCache, and one
decode step of several sequences at once (continuous batching: engine/batch.py)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import torch

from kvbound.kvcache.base import KVCache
from kvbound.models.llama import LlamaModel

DEFAULT_CHUNK = 512
T = TypeVar("T")


def complete(steps: Generator[None, None, T]) -> T:
    """Run a stepwise computation (a prefill, a turn's start) to its end and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def prefill_chunk(chunk: int, capacity: int, evicts: bool) -> int:
    """The prefill step for a cache: under an evicting budget a chunk must leave room for what eviction keeps,
    so it is at most a quarter of the capacity (the window stays mostly in view). An eighth kept 0.1-0.5 points of
    perplexity more at 1/4 KV on Pride and Prejudice, but cost 25-50% more prefill time with int4 weights, which
    dequantize once per step."""
    return max(1, min(chunk, capacity // 4)) if evicts else chunk


class Runner:
    def __init__(self, model: LlamaModel, chunk: int = DEFAULT_CHUNK):
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
        self.model, self.chunk = model, chunk
        self.device = model.device

    def prefill(self, token_ids: list[int], cache: KVCache, chunk: int | None = None) -> torch.Tensor:
        """Feed `token_ids` after what the cache holds; return the logits (V,) after the last one."""
        return complete(self.prefill_steps(token_ids, cache, chunk))

    def prefill_steps(self, token_ids: list[int], cache: KVCache, chunk: int | None = None
                      ) -> Generator[None, None, torch.Tensor]:
        """`prefill` one chunk per step: it yields after each chunk (a scheduler runs other sequences' steps in
        between) and returns the logits after the last token."""
        chunk = chunk or self.chunk
        logits = None
        for offset in range(0, len(token_ids), chunk):
            ids = torch.tensor([token_ids[offset:offset + chunk]], device=self.device)  # (1, T)
            logits = self.model(ids, cache)
            yield
        return logits[0, -1]

    def score(self, token_ids: list[int], cache: KVCache) -> torch.Tensor:
        """Logits (T, V) for every position of one chunk (perplexity)."""
        ids = torch.tensor([token_ids], device=self.device)
        return self.model(ids, cache, all_logits=True)[0]

    def decode(self, token_id: int, cache: KVCache) -> torch.Tensor:
        return self.model(torch.tensor([[token_id]], device=self.device), cache)[0, -1]

    def decode_batch(self, token_ids: list[int], caches: list[KVCache]) -> torch.Tensor:
        """The next token of each of B sequences, one forward for all: logits (B, V); row i is what
        `decode(token_ids[i], caches[i])` returns, up to the rounding of a B-row matmul.

        Where the native whole-model step covers the model, the sequences take it one after the other: on the CPU
        it runs a step in a third of the eager step's time, so even a batch of 8 finishes sooner than one eager
        forward over all 8 rows (measured: docs/speed.md). Either every cache commits its token or none does."""
        if len(caches) == 1 or self.model.native_step_ready():
            if len({id(cache) for cache in caches}) != len(caches):
                raise ValueError("every sequence of a decode batch needs a cache of its own")
            rows: list[torch.Tensor] = []
            try:
                for token_id, cache in zip(token_ids, caches):
                    rows.append(self.decode(token_id, cache))
            except BaseException:
                for cache in caches[: len(rows)]:  # the ones that committed their token give it back
                    cache.rollback(1)
                raise
            return torch.stack(rows)  # (B, V)
        return self.model.forward_batch(torch.tensor(token_ids, device=self.device), caches)
