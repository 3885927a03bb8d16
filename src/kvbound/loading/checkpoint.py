"""One view over both checkpoint formats: config + a lazy tensor iterator (HF names) + tokenizer factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kvbound.config import ModelConfig


@dataclass
class Checkpoint:
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    # Yields (hf_name, tensor) one at a time, already in `dtype`, so at most one extra tensor is alive at once;
    # with quantized=True, GGUF 4/8-bit tensors come as Int4Source/Int8Source (their values, not dequantized).
    tensors: Callable[..., Iterator[tuple[str, object]]]
    make_tokenizer: Callable[[], object]
    tensor_types: dict[str, int] = field(default_factory=dict)  # storage type name -> count (e.g. {"Q4_1": 210})
    file_tensor_bytes: int = 0  # bytes of tensor data on disk
    file_types: dict[str, str] = field(default_factory=dict)  # HF tensor name -> storage type in the file

    def load_model(self, plan, device):
        """The model with each matrix stored as `plan` says (see models/weights.py)."""
        from kvbound.models.llama import LlamaModel
        from kvbound.models.weights import COMPUTE_DTYPES

        stream = self.tensors(COMPUTE_DTYPES[plan.compute], quantized=plan.quantized)
        return LlamaModel.from_tensors(self.config, stream, device=device, plan=plan)


def open_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Resolve `path` (file, directory or known name) and read its metadata; no weights are loaded yet."""
    from kvbound.loading.resolve import resolve_model

    resolved = resolve_model(path)
    if resolved.is_file():
        from kvbound.loading.gguf_file import open_gguf

        return open_gguf(resolved)
    from kvbound.loading.safetensors_dir import open_safetensors_dir

    return open_safetensors_dir(resolved)
