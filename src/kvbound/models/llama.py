"""The Llama-family decoder (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral) over the KVCache interface."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from kvbound.config import ModelConfig
from kvbound.kvcache.base import KVCache
from kvbound.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.output_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     device: torch.device | str = "cpu") -> "LlamaModel":
        """Build on the meta device and adopt each tensor as it arrives: no second copy of the weights in RAM."""
        with torch.device("meta"):
            model = cls(config)
        params = dict(model.named_parameters())
        seen: set[str] = set()
        for name, tensor in tensors:
            if name == "rope_freqs":
                model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None, tensor)
                continue
            target = params.get(name)
            if target is None:
                if name == "lm_head.weight" and config.tie_embeddings:
                    continue  # some files store the tied output matrix again
                from kvbound.errors import ModelFormatError

                raise ModelFormatError(f"the checkpoint has a tensor '{name}' this {config.arch} model does not use; "
                                       "the architecture differs from what its config says")
            if tuple(target.shape) != tuple(tensor.shape):
                from kvbound.errors import ModelFormatError

                raise ModelFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            _set_param(model, name, tensor.to(device))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            from kvbound.errors import ModelFormatError

            raise ModelFormatError(f"the checkpoint lacks {len(missing)} weights (first: {missing[0]})")
        if model.inv_freq.is_meta:
            model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        model.inv_freq = model.inv_freq.to(device)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids: (1, T) → logits (1, T, V) if all_logits else (1, 1, V) for the last token.

        The cache chooses the positions (after any eviction it does to make room)."""
        positions = cache.begin(input_ids.shape[1])  # (T,)
        x = self.embed_tokens(input_ids)  # (1, T, hidden)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (T, D)
        try:
            for block in self.layers:
                x = block(x, cos, sin, cache)
        except BaseException:
            cache.rollback(0)
            raise
        cache.end()
        x = self.norm(x if all_logits else x[:, -1:])
        return torch.nn.functional.linear(x, self.output_weight()).float()


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
