"""One decoder block: norms, attention projections with RoPE, MLP. Attention itself is the `attend` it is given
(the cache's), so a block holds weights only; models/compiled.py compiles its two halves around attention."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kvbound.config import ModelConfig
from kvbound.models.layers import MLP, RMSNorm, apply_rope
from kvbound.models.linear import DenseLinear

# attend(layer, q, k, v) → attention output: q (B, H, T, D), k and v (B, n_kv, T, D) → (B, H, T, D). A single
# sequence passes its cache's `attend`; a decode batch passes one that sends each row to its own cache.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        # q, k and v in one matrix: one matmul per step instead of three (fused by models/weights.py on load).
        self.qkv_proj = DenseLinear(config.hidden_size, q + 2 * kv, bias=config.attention_bias)
        self.o_proj = DenseLinear(q, config.hidden_size, bias=config.output_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x (B, T, hidden); cos/sin (T, D) shared by the rows, or (B, 1, 1, D) one position per row."""
        return self.output(attend(self.layer, *self.project(x, cos, sin)))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) and k (rotated), v (B, n_kv, T, D)."""
        B, T, _ = x.shape
        H, rotated = self.num_heads, self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, rotated + self.num_kv_heads, self.head_dim)  # (B, T, H + 2 n_kv, D)
        # q and k rotate together (one RoPE pass over H + n_kv heads): per-op overhead dominates decode here.
        q, k = apply_rope(qkv[:, :, :rotated].transpose(1, 2), cos, sin).split((H, self.num_kv_heads), dim=1)
        return q, k, qkv[:, :, rotated:].transpose(1, 2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output (B, H, T, D) through o_proj → (B, T, hidden)."""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        return self.finish(x, attend(self.self_attn.layer, *self.attention_inputs(x, cos, sin)))

    # The two halves around attention (which reads and writes the cache): models/compiled.py compiles these.
    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def finish(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.output(attention)
        return x + self.mlp(self.post_attention_layernorm(x))
