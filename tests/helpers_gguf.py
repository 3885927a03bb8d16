"""Tiny GGUF files for tests of the loading errors: a wrong architecture, a truncated file, random bytes."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np


def write_gguf(path: Path, arch: str = "llama", *, layers: int = 1, hidden: int = 8, heads: int = 2,
               vocab: int = 16) -> Path:
    """A structurally valid GGUF with random F32 weights for a tiny model of `arch` (no tokenizer)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (2 * hidden, hidden)),
                            ("ffn_up", (2 * hidden, hidden)), ("ffn_down", (hidden, 2 * hidden))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut the file's tail off, as an interrupted download would."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(int(size * keep_fraction))
    return path


def write_garbage(path: Path, size: int = 4096) -> Path:
    """Random bytes under a .gguf name."""
    path.write_bytes(os.urandom(size))
    return path
