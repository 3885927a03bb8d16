"""Model files → (ModelConfig, weights, tokenizer). GGUF via the `gguf` package, HF safetensors directories."""

from kvbound.loading.checkpoint import Checkpoint, open_checkpoint
from kvbound.loading.resolve import DEFAULT_MODEL, KNOWN_MODELS, resolve_model

__all__ = ["Checkpoint", "open_checkpoint", "resolve_model", "DEFAULT_MODEL", "KNOWN_MODELS"]
