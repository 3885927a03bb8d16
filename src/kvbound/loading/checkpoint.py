"""One view over both checkpoint formats: config + a lazy tensor iterator (HF names) + tokenizer factory.
The format readers (gguf_file, safetensors_dir) build it; `kvbound.loading.open_checkpoint` picks the reader."""

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
    tensors: Callable[..., Iterator[tuple[str, object]]] | None  # None once closed
    make_tokenizer: Callable[[], object] | None
    tensor_types: dict[str, int] = field(default_factory=dict)  # storage type name -> count (e.g. {"Q4_1": 210})
    file_tensor_bytes: int = 0  # bytes of tensor data on disk
    file_types: dict[str, str] = field(default_factory=dict)  # HF tensor name -> storage type in the file

    def load_model(self, plan, device):
        """The model with each matrix stored as `plan` says (see models/weights.py)."""
        from kvbound.models.llama import LlamaModel
        from kvbound.models.weights import COMPUTE_DTYPES

        stream = self.tensors(COMPUTE_DTYPES[plan.compute], quantized=plan.quantized)
        return LlamaModel.from_tensors(self.config, stream, device=device, plan=plan)

    def close(self) -> None:
        """Drop the file reader (its memory map and parsed metadata); config, path and the counts stay. After
        this, neither tensors nor a tokenizer can be read."""
        self.tensors = self.make_tokenizer = None
