"""GGUF checkpoints: metadata → ModelConfig, tensors dequantized one by one (memory-mapped) to HF names.

llama.cpp's converter permutes Q/K rows of `llama`-arch models into the interleaved RoPE layout; we undo it so
one model definition (rotate-half RoPE, as in transformers) serves both. `qwen2` is stored in NEOX layout already.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kvbound.config import SUPPORTED_ARCHS, ModelConfig
from kvbound.errors import ModelFormatError, UnsupportedModelError
from kvbound.loading.checkpoint import Checkpoint
from kvbound.models.linear import Int4Source, Int8Source

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (interleaved pairs → rotate-half halves), per head, on the output rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF blocks of 32 weights: (bytes per block, layout). Q4_0: f16 d, 16 bytes of nibbles, w = (q - 8)·d;
# Q4_1: f16 d, f16 m, nibbles, w = q·d + m; Q8_0: f16 d, 32 int8, w = q·d. Low nibbles hold weights 0-15.
_RAW_BLOCKS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def raw_source(t) -> "Int4Source | Int8Source | None":
    """A GGUF tensor's quantized values without dequantizing them, for the types stored as-is (else None)."""
    kind = t.tensor_type.name
    if kind not in _RAW_BLOCKS or t.data.ndim != 2:
        return None
    rows = t.data.shape[0]
    blocks = np.asarray(t.data).reshape(rows, -1, _RAW_BLOCKS[kind])  # (N, K/32, bytes)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # (N, K/32)
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, -1)
        return Int8Source(q, d)
    if kind == "Q4_1":
        low = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = blocks[..., 4:]
    else:
        low, nibbles = -8 * d, blocks[..., 2:]
    q = torch.from_numpy(np.concatenate([nibbles & 15, nibbles >> 4], -1)).reshape(rows, -1)  # (N, K) uint8
    return Int4Source(q, d, low)


def _field(fields: dict, key: str, default=None, required: bool = False):
    value = fields.get(key)
    if value is None:
        if required:
            raise ModelFormatError(f"GGUF metadata lacks '{key}'; the file is incomplete or not a model")
        return default
    return value


def read_config(fields: dict, path: Path) -> ModelConfig:
    arch = _field(fields, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    hidden = int(_field(fields, f"{arch}.embedding_length", required=True))
    heads = int(_field(fields, f"{arch}.attention.head_count", required=True))
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = _field(fields, f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise ModelFormatError(f"{path}: GGUF metadata has neither '{arch}.vocab_size' nor a tokenizer vocabulary")
    head_dim = int(_field(fields, f"{arch}.attention.key_length") or hidden // heads)
    rope_dims = _field(fields, f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    scaling = None
    if _field(fields, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"rope scaling type '{_field(fields, f'{arch}.rope.scaling.type')}' is not supported")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(fields, f"{arch}.feed_forward_length", required=True)),
        num_layers=int(_field(fields, f"{arch}.block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(_field(fields, f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_context=int(_field(fields, f"{arch}.context_length", 4096)),
        rope_theta=float(_field(fields, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(fields, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        attention_bias=arch == "qwen2",
        rope_scaling=scaling,
        sliding_window=None,
        name=str(_field(fields, "general.name", path.stem)),
    )


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    from kvbound.loading.gguf_index import GGUFIndex

    size = path.stat().st_size
    if size < 32:
        raise ModelFormatError(f"{path} is {size} bytes: truncated or not a GGUF file; re-install the model "
                               "(`kvbound pull`) or check the path")
    try:
        reader = GGUFIndex(path)
    except Exception as e:  # GGUFFormatError, or OSError/ValueError from mmap and numpy on odd files
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                               "truncated or corrupt — re-download or re-install it") from None
    fields = reader.fields
    config = read_config(fields, path)
    by_name = {t.name: t for t in reader.tensors}
    tie = "output.weight" not in by_name
    config = ModelConfig(**{**config.__dict__, "tie_embeddings": tie})
    if config.arch == "llama" and "rope_freqs.weight" in by_name:
        config = ModelConfig(**{**config.__dict__, "rope_scaling": {"rope_type": "gguf_freqs"}})
    supported = set(gguf.quants._type_traits) | {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                                  gguf.GGMLQuantizationType.BF16}  # noqa: SLF001
    types: dict[str, int] = {}
    file_types: dict[str, str] = {}
    data_bytes = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if hf_name(t.name):
            file_types[hf_name(t.name)] = t.tensor_type.name
        data_bytes += int(t.n_bytes)
        if t.tensor_type not in supported:
            raise UnsupportedModelError(f"tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                                        "cannot dequantize; convert the model to another quantization type")
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}" for i in range(config.num_layers) for n in (
            "attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
            "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")]
    missing = [n for n in needed if n not in by_name]
    if missing:
        raise ModelFormatError(f"{path} lacks {len(missing)} tensors (first: {missing[0]}); the file is incomplete")

    def tensors(dtype: torch.dtype, quantized: bool = False) -> Iterator[tuple[str, object]]:
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            heads = None
            if config.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                heads = config.num_heads
            elif config.arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                heads = config.num_kv_heads
            source = raw_source(t) if quantized else None
            if source is not None:  # 4/8-bit blocks as they are, for storage that keeps them quantized
                if heads is not None:
                    source = source.take(torch.from_numpy(unpermute_rope_rows(np.arange(source.shape[0]), heads)))
                yield name, source
                reader.release(t)  # the values were copied out: the file's pages may leave RSS
                continue
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, shape (out, in) for matrices
            except Exception as e:
                raise ModelFormatError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be decoded: {e}") from None
            if heads is not None:
                array = unpermute_rope_rows(array, heads)
            if not array.flags.writeable:  # F32 tensors come back as views of the read-only memory map
                array = array.copy()
            # Tensors a quantized plan re-quantizes stay fp32 until then.
            yield name, torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32 if quantized else dtype)
            reader.release(t)

    def make_tokenizer():
        from kvbound.tokenizer import Tokenizer

        return Tokenizer.from_gguf(reader)

    return Checkpoint(path=path, format="gguf", config=config, tensors=tensors, make_tokenizer=make_tokenizer,
                      tensor_types=types, file_tensor_bytes=data_bytes, file_types=file_types)
