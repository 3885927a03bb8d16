"""Model files → (ModelConfig, weights, tokenizer). GGUF via the `gguf` package, HF safetensors directories."""

from __future__ import annotations

from pathlib import Path

from kvbound.loading.checkpoint import Checkpoint
from kvbound.loading.gguf_file import open_gguf
from kvbound.loading.resolve import DEFAULT_MODEL, KNOWN_MODELS, resolve_model
from kvbound.loading.safetensors_dir import open_safetensors_dir

__all__ = ["Checkpoint", "open_checkpoint", "resolve_model", "DEFAULT_MODEL", "KNOWN_MODELS"]


def open_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Resolve `path` (file, directory or known name) and read its metadata; no weights are loaded yet."""
    resolved = resolve_model(path)
    return open_gguf(resolved) if resolved.is_file() else open_safetensors_dir(resolved)
