"""Model definitions: one Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral)."""

from kvbound.models.llama import LlamaModel

__all__ = ["LlamaModel"]
