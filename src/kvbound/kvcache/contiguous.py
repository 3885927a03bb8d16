"""A preallocated, contiguous per-session KV cache (K/V per KV head), sized once; it never grows or copies."""

from __future__ import annotations

import torch

from kvbound.config import ModelConfig
from kvbound.errors import ContextOverflowError
from kvbound.kvcache.base import KVCache, attention, step_mask
from kvbound.kvcache.pool import lazy_zeros


class ContiguousCache(KVCache):
    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1 token, got {capacity}")
        self.config, self.capacity, self.dtype = config, capacity, dtype
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)  # (L, n_kv, S_max, D)
        self.k = lazy_zeros(*shape, dtype=dtype, device=device)
        self.v = lazy_zeros(*shape, dtype=dtype, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self._len = 0
        self._step: tuple[int, int, torch.Tensor | None] | None = None  # (start, T, mask)

    @property
    def num_tokens(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def begin(self, num_tokens: int) -> torch.Tensor:
        T = num_tokens
        if self._len + T > self.capacity:
            raise ContextOverflowError(
                f"the KV cache holds {self.capacity} tokens: {self._len} are used and this step needs {T} more; "
                "start a new chat, shorten the prompt, or use a bounded cache with an eviction policy",
                needed=self._len + T, available=self.capacity)
        start = self._len
        positions = torch.arange(start, start + T, device=self.positions.device)
        self.positions[start:start + T] = positions
        mask = step_mask(positions, self.positions[:start + T], self.config.sliding_window)
        self._step = (start, T, mask)
        return positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, T, mask = self._step
        end = start + T
        self.k[layer, :, start:end] = k[0]
        self.v[layer, :, start:end] = v[0]
        keys = self.k[layer, :, :end].unsqueeze(0)  # (1, n_kv, S, D), a view
        values = self.v[layer, :, :end].unsqueeze(0)
        return attention(q, keys, values, mask)

    def end(self) -> None:
        start, T, _ = self._step
        self._len = start + T
        self._step = None

    def rollback(self, num_tokens: int) -> None:
        self._len = max(0, self._len - num_tokens)
        self._step = None
