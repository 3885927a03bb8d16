"""Memory arithmetic for KV storage — the one place. Estimator, allocator, ledger and errors all read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbound.config import ModelConfig

KV_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return KV_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(KV_DTYPES)}") from None


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "fp32"

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: str = "fp32") -> "KVSpec":
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, dtype)

    @property
    def element_bytes(self) -> int:
        return KV_DTYPES[self.dtype].itemsize

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer, stored per KV head (never after repeat_kv)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_bytes

    def bytes_for(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def tokens_for(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_token
