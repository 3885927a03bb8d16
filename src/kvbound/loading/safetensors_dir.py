"""HF model directories: config.json → ModelConfig; *.safetensors memory-mapped, tensors yielded one by one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from kvbound.config import ModelConfig
from kvbound.errors import ModelFormatError, UnsupportedModelError
from kvbound.loading.checkpoint import Checkpoint

_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


def read_config(raw: dict, path: Path) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((_ARCHS[a] for a in archs if a in _ARCHS), None) or {"llama": "llama", "qwen2": "qwen2",
                                                                      "mistral": "mistral"}.get(raw.get("model_type"))
    if arch is None:
        raise UnsupportedModelError(f"{path}: architecture {archs or raw.get('model_type')} is not supported "
                                    f"(supported: {', '.join(_ARCHS)})")
    # transformers 5 writes RoPE settings as a nested `rope_parameters`; the Hub's files keep them top-level.
    rope = dict(raw.get("rope_parameters") or {})
    theta = raw.get("rope_theta", rope.pop("rope_theta", 10000.0))
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise UnsupportedModelError(f"{path}: rope scaling '{kind}' is not supported (llama3 is)")
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
        return ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_context=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=float(theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            output_bias=arch != "qwen2" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_scaling=scaling,
            sliding_window=(raw.get("sliding_window") or None) if arch == "mistral" else None,
            name=str(raw.get("_name_or_path") or path.name),
        )
    except KeyError as e:
        raise ModelFormatError(f"{path}/config.json lacks {e}; the model directory is incomplete") from None


def open_safetensors_dir(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}/config.json cannot be read: {e}") from None
    config = read_config(raw, path)
    files = sorted(path.glob("*.safetensors"))
    names: dict[str, Path] = {}
    file_types: dict[str, str] = {}
    types: dict[str, int] = {}
    data_bytes = 0
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for key in handle.keys():
                    names[key] = f
                    sl = handle.get_slice(key)
                    dtype = sl.get_dtype()
                    file_types[key.removeprefix("model.")] = dtype
                    types[dtype] = types.get(dtype, 0) + 1
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    data_bytes += numel * {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 4)
        except Exception as e:
            raise ModelFormatError(f"{f} is not a readable safetensors file ({e}); it may be truncated") from None
    if "lm_head.weight" not in names and not config.tie_embeddings:
        config = ModelConfig(**{**config.__dict__, "tie_embeddings": True})
    if "model.embed_tokens.weight" not in names:
        raise ModelFormatError(f"{path}: no model.embed_tokens.weight in the safetensors files")

    def tensors(dtype: torch.dtype, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for key, f in names.items():
            name = key.removeprefix("model.")
            if name.startswith("layers.") and "rotary_emb" in name:
                continue
            with safe_open(f, framework="pt") as handle:  # quantized storage quantizes from fp32
                yield name, handle.get_tensor(key).to(torch.float32 if quantized else dtype)

    def make_tokenizer():
        from kvbound.tokenizer import Tokenizer

        cfg = path / "tokenizer_config.json"
        return Tokenizer.from_files(path / "tokenizer.json", cfg if cfg.is_file() else None)

    return Checkpoint(path=path, format="safetensors", config=config, tensors=tensors, make_tokenizer=make_tokenizer,
                      tensor_types=types, file_tensor_bytes=data_bytes, file_types=file_types)
