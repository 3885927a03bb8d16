"""The cache interface the model sees: reserve room for a step, attend per layer, commit.

The cache owns attention over what it stores, because only it knows the storage (contiguous, paged, quantized)
and which tokens are still held; the model hands it rotated q/k and v per KV head (never repeat_kv'd).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodePlan:
    """What a native single-token step needs from the cache (models/native_step.py): the pool's K/V tensors
    (layers, n_kv, slots, D), the new token's slot, the sequence's blocks in order and the tokens they hold (the new
    one included), and whether the policy wants each layer's attention (then `observe` is called per layer)."""

    k: torch.Tensor
    v: torch.Tensor
    block: int
    slot: int
    table: torch.Tensor  # (nblocks,) int64
    held: int
    observe: bool
    # quantized KV (k/v are then the codes): the pool's scales and zeros, and the residual window (layers, n_kv,
    # block, D) whose position `rest` the new token takes (a step that would fill the block is not planned)
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    bits: int = 0
    group: int = 0
    res_k: torch.Tensor | None = None
    res_v: torch.Tensor | None = None
    rest: int = 0


class KVCache(ABC):
    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens currently held (committed)."""

    @abstractmethod
    def begin(self, num_tokens: int) -> torch.Tensor:
        """Prepare a step that appends `num_tokens` tokens (evicting first if the policy allows) and return
        their RoPE positions (T,); raise before any write if they cannot fit."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v of `layer` and return attention of q over every held token.

        q: (1, num_heads, T, D); k, v: (1, num_kv_heads, T, D) → (1, num_heads, T, D).
        """

    @abstractmethod
    def end(self) -> None:
        """Commit the tokens of the step begun by `begin`."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Drop the newest `num_tokens` held tokens (e.g. a turn that failed half-way)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds (reserved, not just used)."""

    def decode_plan(self) -> DecodePlan | None:
        """For the begun single-token step, where a native step writes and reads; None: run the eager step."""
        return None

    def observe(self, layer: int, logits: torch.Tensor) -> None:
        """Attention logits (n_kv, queries, S) a native step computed for `layer`, for the eviction policy."""


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None = None
                ) -> torch.Tensor:
    """Bool mask (T, S): a query sees every held key whose position is not after its own (and, with a sliding
    `window`, is less than `window` positions before it)."""
    mask = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        mask &= key_positions[None, :] > query_positions[:, None] - window
    return mask


def step_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """The attention mask of a step; None when every held key is visible (a single query, no window reached)."""
    if query_positions.numel() == 1 and (window is None or int(query_positions[0] - key_positions[0]) < window):
        return None
    return causal_mask(query_positions, key_positions, window)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over KV heads (grouped, never repeat_kv'd). Multi-query steps in bf16/fp16 on CPU run in fp32: PyTorch's
    CPU flash kernel keeps a compiled kernel per (queries, keys) shape in low precision, and a chat's prefills
    never repeat a shape — RSS grew ~6 MB a turn over a 200-turn chat (measured; fp32 and single-query decode
    stay flat). The upcast costs one fp32 copy of the layer's K and V per prefill chunk."""
    if q.shape[2] > 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
