"""The Llama-family decoder (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral) over the KVCache interface."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn

from kvbound.config import ModelConfig
from kvbound.kvcache.base import KVCache
from kvbound.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from kvbound.models.linear import DenseLinear
from kvbound.models.weights import COMPUTE_DTYPES, WeightsPlan, materialize, matrix_modules, weights_bytes


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        # q, k and v in one matrix: one matmul per step instead of three (fused by models/weights.py on load).
        self.qkv_proj = DenseLinear(config.hidden_size, q + 2 * kv, bias=config.attention_bias)
        self.o_proj = DenseLinear(q, config.hidden_size, bias=config.output_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        H, rotated = self.num_heads, self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, rotated + self.num_kv_heads, self.head_dim)  # (B, T, H + 2 n_kv, D)
        # q and k rotate together (one RoPE pass over H + n_kv heads): per-op overhead dominates decode here.
        q, k = apply_rope(qkv[:, :, :rotated].transpose(1, 2), cos, sin).split((H, self.num_kv_heads), dim=1)
        v = qkv[:, :, rotated:].transpose(1, 2)  # (B, n_kv, T, D)
        out = cache.attend(self.layer, q, k, v)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # The embedding table is a matrix like the others (`rows` looks tokens up), so a tied output projection
        # is the same stored matrix, quantized or not.
        self.embed_tokens = DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Iterable[tuple[str, object]],
                     device: torch.device | str = "cpu", plan: WeightsPlan | None = None) -> "LlamaModel":
        """Build on the meta device and adopt each tensor as it arrives: no second copy of the weights in RAM.
        `plan` chooses each matrix's storage (models/weights.py); without one, everything stays dense in the
        dtype of the tensors given."""
        device = torch.device(device)
        tensors = iter(tensors)
        first = next(tensors, None)
        if plan is None:
            dtype = first[1].dtype if first is not None and isinstance(first[1], torch.Tensor) else torch.float32
            name = {v: k for k, v in COMPUTE_DTYPES.items()}.get(dtype, "fp32")
            plan = WeightsPlan(name, name, {m: "dense" for m in matrix_modules(config)}, device.type)
        with torch.device("meta"):
            model = cls(config)
        stream = itertools.chain([first] if first is not None else [], tensors)

        def without_rope(items):
            for name, tensor in items:
                if name == "rope_freqs":
                    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None, tensor)
                else:
                    yield name, tensor

        materialize(model, config, without_rope(stream), plan, device)
        if model.inv_freq.is_meta:
            model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        model.inv_freq = model.inv_freq.to(device)
        model.plan = plan
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations; dense weights)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def weights_bytes(self) -> int:
        return weights_bytes(self)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids: (1, T) → logits (1, T, V) if all_logits else (1, 1, V) for the last token.

        The cache chooses the positions (after any eviction it does to make room)."""
        positions = cache.begin(input_ids.shape[1])  # (T,)
        x = self.embed_tokens.rows(input_ids)  # (1, T, hidden)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (T, D)
        try:
            for block in self.layers:
                x = block(x, cos, sin, cache)
        except BaseException:
            cache.rollback(0)
            raise
        cache.end()
        x = self.norm(x if all_logits else x[:, -1:])
        return (self.embed_tokens if self.lm_head is None else self.lm_head)(x).float()
