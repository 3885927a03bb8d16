"""Memory arithmetic for KV storage — the one place. The allocator, estimator, ledger and error messages all
read it, so an estimate and an allocation cannot disagree.

Layout (per layer, per KV head; never after repeat_kv):
  fp32/fp16/bf16: K and V of each token in that dtype.
  int8 / int4 (KIVI): keys quantized per channel over the tokens of a block, values per token in groups of
  `group` channels; asymmetric (scale + zero, fp16 each). A sequence's newest, partly filled block stays in
  full precision (the residual window) and is quantized when it fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvbound.config import ModelConfig

FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_BITS: dict[str, int] = {"int8": 8, "int4": 4}
KV_DTYPE_NAMES = (*FLOAT_DTYPES, *QUANT_BITS)
SCALE_BYTES = 2  # scales and zero points are stored in fp16
DEFAULT_BLOCK = 32
DEFAULT_GROUP = 32

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000 ** 2, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1000 ** 3, "GIB": 1 << 30}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(FLOAT_DTYPES)}") from None


def parse_size(text: str | int) -> int:
    """'64MiB', '1.5GB', '500k', 1048576 → bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read size '{text}'; write it like 64MiB, 512MB, 1GiB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive, got '{text}'")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "fp32"  # storage type of the KV cache
    compute_dtype: str = "fp32"  # dtype of the residual window and of dequantized blocks
    block_size: int = DEFAULT_BLOCK
    group: int = DEFAULT_GROUP

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPE_NAMES:
            raise ValueError(f"unknown KV dtype '{self.dtype}'; choose one of {', '.join(KV_DTYPE_NAMES)}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.quantized and self.head_dim % self.group:
            raise ValueError(f"head_dim {self.head_dim} is not a multiple of the quantization group {self.group}")

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: str = "fp32", compute_dtype: str = "fp32",
                  block_size: int = DEFAULT_BLOCK) -> "KVSpec":
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, dtype, compute_dtype, block_size,
                   min(DEFAULT_GROUP, config.head_dim))

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_BITS

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.dtype] if self.quantized else FLOAT_DTYPES[self.dtype].itemsize * 8

    @property
    def compute_element_bytes(self) -> int:
        return FLOAT_DTYPES[self.compute_dtype].itemsize

    @property
    def _rows(self) -> int:  # (layer, kv head) pairs
        return self.num_layers * self.num_kv_heads

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block of `block_size` tokens takes in the pool, scales included."""
        B, D, rows = self.block_size, self.head_dim, self._rows
        if not self.quantized:
            return 2 * rows * B * D * FLOAT_DTYPES[self.dtype].itemsize
        data = 2 * rows * B * D * self.bits // 8
        key_scales = rows * D * 2 * SCALE_BYTES  # per channel, per block: scale + zero
        value_scales = rows * B * (D // self.group) * 2 * SCALE_BYTES  # per token, per group
        return data + key_scales + value_scales

    @property
    def bytes_per_token(self) -> float:
        """Average bytes per held token in full blocks (exact for fp types)."""
        return self.bytes_per_block / self.block_size

    @property
    def residual_bytes(self) -> int:
        """Full-precision window of one sequence (quantized types only): one block of K and V."""
        return 2 * self._rows * self.block_size * self.head_dim * self.compute_element_bytes if self.quantized else 0

    def pooled(self, num_tokens: int) -> int:
        """Of a sequence's `num_tokens`, those in pool blocks: a quantized sequence keeps its newest partial block in
        its full-precision residual window."""
        return (num_tokens // self.block_size) * self.block_size if self.quantized else num_tokens

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def bytes_for(self, num_tokens: int) -> int:
        """Pool bytes that hold `num_tokens` tokens of one sequence (whole blocks)."""
        return self.blocks_for(num_tokens) * self.bytes_per_block

    def blocks_in(self, budget_bytes: int, sequences: int = 1) -> int:
        """How many pool blocks a byte budget buys once `sequences` residual windows are set aside."""
        return max(0, (budget_bytes - sequences * self.residual_bytes) // self.bytes_per_block)

    def tokens_in(self, budget_bytes: int, sequences: int = 1) -> int:
        extra = self.block_size - 1 if self.quantized else 0  # the residual window holds a partial block
        return self.blocks_in(budget_bytes, sequences) * self.block_size + extra * sequences
