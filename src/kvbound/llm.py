"""`load()` and the LLM handle: model + tokenizer + runner; makes chats and one-shot generations."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from kvbound.chat.session import Chat, Reply, sampling_params
from kvbound.config import ModelConfig
from kvbound.engine.generate import Generation, stream_tokens
from kvbound.engine.runner import DEFAULT_CHUNK, Runner
from kvbound.errors import ContextOverflowError
from kvbound.kvcache.contiguous import ContiguousCache
from kvbound.kvcache.spec import KVSpec, parse_dtype
from kvbound.loading import open_checkpoint
from kvbound.models.llama import LlamaModel

DTYPES = ("auto", "fp32", "bf16", "fp16")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    format: str
    arch: str
    parameters: int
    dtype: str
    device: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    kv_bytes_per_token: int
    weights_bytes: int
    file_tensor_types: dict


class LLM:
    def __init__(self, path: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
                 chunk: int = DEFAULT_CHUNK):
        self.device = pick_device(device)
        self.dtype_name = pick_dtype(dtype, self.device)
        self.checkpoint = open_checkpoint(path)
        self.config: ModelConfig = self.checkpoint.config
        self.tokenizer = self.checkpoint.make_tokenizer()
        self.model = LlamaModel.from_tensors(self.config, self.checkpoint.tensors(parse_dtype(self.dtype_name)),
                                             device=self.device)
        self.runner = Runner(self.model, chunk=chunk)
        self.kv_spec = KVSpec.for_model(self.config, self.dtype_name)

    # -- sessions ---------------------------------------------------------------------------------------------
    def new_cache(self, context: int | None = None) -> ContiguousCache:
        capacity = self.config.max_context if context is None else int(context)
        if not 1 <= capacity <= self.config.max_context:
            raise ValueError(f"context must be between 1 and the model's {self.config.max_context} tokens, got {context}")
        return ContiguousCache(self.config, capacity, dtype=self.model.dtype, device=self.device)

    def chat(self, system: str | None = None, *, context: int | None = None) -> Chat:
        """A new conversation with its own KV cache (preallocated for `context` tokens, default the model's)."""
        if system is not None and not isinstance(system, str):
            raise ValueError("system must be a string")
        return Chat(self, self.new_cache(context), system=system or None)

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False, **sampling: Any) -> Reply:
        """One user message through the chat template (or `raw` text completion) in a fresh cache."""
        if raw:
            pieces = self.stream_raw(prompt, **sampling)
            for _ in pieces:
                pass
            return self.last_raw_reply
        return self.chat(system=system).send(prompt, **sampling)

    def stream_raw(self, prompt: str, **sampling: Any) -> Iterator[str]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("the prompt is empty; give some text to complete")
        params = sampling_params(**sampling)
        started = time.perf_counter()
        ids = self.tokenizer.encode(prompt, add_special=True)
        cache = self.new_cache()
        if len(ids) + 1 > cache.capacity:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens; the model's context is {cache.capacity} "
                                       "tokens; shorten the prompt", needed=len(ids) + 1, available=cache.capacity)
        logits = self.runner.prefill(ids, 0, cache)
        result = Generation(prefill_s=time.perf_counter() - started)
        yield from stream_tokens(self.runner, self.tokenizer, cache, logits, len(ids), params, ids, result)
        decoded = max(len(result.token_ids) - 1, 0)
        self.last_raw_reply = Reply(
            text=result.text, token_ids=result.token_ids, prompt_tokens=len(ids), context_tokens=cache.num_tokens,
            kv_bytes=self.kv_spec.bytes_for(cache.num_tokens), elapsed_s=time.perf_counter() - started,
            finish_reason=result.finish_reason, ttft_s=result.prefill_s,
            decode_tokens_per_s=decoded / result.decode_s if result.decode_s > 0 else 0.0)

    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(
            name=c.name, path=str(self.checkpoint.path), format=self.checkpoint.format, arch=c.arch,
            parameters=sum(p.numel() for p in self.model.parameters()), dtype=self.dtype_name,
            device=str(self.device), layers=c.num_layers, heads=c.num_heads, kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, max_context=c.max_context, vocab_size=c.vocab_size,
            kv_bytes_per_token=self.kv_spec.bytes_per_token,
            weights_bytes=sum(p.nbytes for p in self.model.parameters()),
            file_tensor_types=dict(self.checkpoint.tensor_types))


def load(model: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
         chunk: int = DEFAULT_CHUNK) -> LLM:
    """Load a model: a .gguf path, a safetensors directory, or a known name (default: smollm2-135m)."""
    return LLM(model, dtype=dtype, device=device, chunk=chunk)
