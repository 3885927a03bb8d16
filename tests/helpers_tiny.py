"""Tiny random-weight transformers models and their checkpoint files (HF safetensors dir, GGUF), for tests that
run the whole stack in seconds against transformers as the reference.

The GGUF writer follows llama.cpp's convert_hf_to_gguf.py on its own (names, Q/K row permutation, rope_freqs
factors): it shares no code with kvbound's loader, so a round trip checks the loader rather than restating it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

ARCH_CLASSES = {  # arch -> (config class name, model class name) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
TINY_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # with head_dim 16, some frequencies scale, some blend
# name -> (arch, overrides of TINY_BASE): the matrix every model-level test runs through.
TINY_CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2-gqa4": ("qwen2", {"num_key_value_heads": 1, "rope_theta": 1e6}),  # q/k/v bias, 4 query heads per KV head
    "mistral": ("mistral", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
BOS_ID, EOS_ID = 1, 2


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A transformers *ForCausalLM (fp32, eval, eager attention) with every parameter drawn at random.

    Norm weights are drawn around 1 and biases around 0, both far from their init values, so a loader that
    drops or misplaces one of them shows up in the logits.
    """
    import transformers

    config_name, model_name = ARCH_CLASSES[arch]
    config = getattr(transformers, config_name)(**{**TINY_BASE, **overrides})
    config._attn_implementation = "eager"  # the plain reference path, independent of SDPA kernels
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                torch.nn.init.normal_(param, mean=1.0, std=0.3)
            elif name.endswith(".bias"):
                torch.nn.init.normal_(param, std=0.3)
            else:
                torch.nn.init.normal_(param, std=0.2)
    return model


def tiny_case_model(case: str, seed: int = 0):
    arch, overrides = TINY_CASES[case]
    return tiny_hf_model(arch, seed=seed, **overrides)


def random_ids(n: int, vocab_size: int = TINY_BASE["vocab_size"], seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits (T, V) for `ids` in one forward pass."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def reference_greedy(model, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """transformers' greedy continuation of `ids`, cut after the first of `stop_ids` (kept, as kvbound keeps it).

    eos_token_id=None makes generate run the full `max_new_tokens` whatever the model's generation config
    says, so the stop rule applied is the caller's, the same one kvbound applies.
    """
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None)
    new = out[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
    return new if stop is None else new[:stop + 1]


# ---- tokenizer --------------------------------------------------------------------------------------------------


def _byte_char(b: int) -> str:
    """GPT-2's bytes_to_unicode for the bytes used here: printable ASCII maps to itself, byte b <= 32 to chr(256+b)."""
    return chr(b) if 33 <= b <= 126 else chr(256 + b)


def tiny_vocab(vocab_size: int = TINY_BASE["vocab_size"]) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges "a b", llama.cpp token types) of a byte-level BPE vocab of exactly `vocab_size` tokens:
    the special tokens, newline + printable ASCII, then merges of common letters."""
    tokens = list(SPECIAL_TOKENS) + [_byte_char(b) for b in [10, *range(32, 127)]]
    letters = "etaoinshrdlu"
    merges = []
    for left, right in [(_byte_char(32), c) for c in letters] + [(a, b) for a in letters for b in letters]:
        if len(tokens) >= vocab_size:
            break
        tokens.append(left + right)
        merges.append(f"{left} {right}")
    if len(tokens) != vocab_size:
        raise ValueError(f"tiny_vocab builds between 99 and 255 tokens, not {vocab_size}")
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3: control, 1: normal
    return tokens, merges, types


def save_tokenizer_json(path: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json of the tiny byte-level BPE vocab (no chat template: ChatML)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = tiny_vocab(vocab_size)
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.save(str(path / "tokenizer.json"))
    config = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_tokenizer(path: Path, vocab_size: int = 128):
    """The kvbound Tokenizer of the tiny vocab, saved as tokenizer.json into `path`."""
    from kvbound.tokenizer import Tokenizer

    save_tokenizer_json(path, vocab_size)
    return Tokenizer.from_files(path / "tokenizer.json", path / "tokenizer_config.json")


# ---- HF safetensors directory -----------------------------------------------------------------------------------


def save_hf_dir(model, path: Path, config_layout: str = "hub") -> Path:
    """`save_pretrained` (safetensors) + a tiny tokenizer.json into `path`.

    config_layout "hub": config.json keeps RoPE as top-level `rope_theta` / `rope_scaling`, as transformers 4.x
    wrote it and as the Hub's checkpoints (SmolLM2, Qwen2.5, Llama 3.x) carry it. "transformers5": exactly what
    this transformers writes (a nested `rope_parameters` dict, no top-level `rope_theta`).
    """
    path = Path(path)
    model.save_pretrained(path)
    if config_layout == "hub":
        raw = json.loads((path / "config.json").read_text())
        rope = dict(raw.pop("rope_parameters", None) or {})
        if rope:
            raw["rope_theta"] = rope.pop("rope_theta")
            if rope.get("rope_type", "default") != "default":
                raw["rope_scaling"] = rope
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    elif config_layout != "transformers5":
        raise ValueError(f"config_layout must be 'hub' or 'transformers5', got {config_layout!r}")
    save_tokenizer_json(path, model.config.vocab_size)
    return path


# ---- GGUF -------------------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {  # llama.cpp's tensor names (gguf-py constants / tensor_mapping.py)
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows → interleaved pairs, per head (any row-major
    array whose first axis is the output rows: weights, biases, or quantized blocks of whole rows)."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs.weight for llama3 scaling: per-frequency divisors, (head_dim/2,) f32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(model, path: Path, qtype: str = "F32"):
    """Write `model` as a llama.cpp-style GGUF (byte-level BPE tokenizer, pre 'smollm') at `path`.

    qtype "F32" stores every tensor in f32; "Q8_0", "Q4_0", ... quantize the 2-D weights (1-D norms and
    biases stay f32, as llama.cpp does). Returns the reference: the transformers model whose weights are
    exactly what the file decodes to (`model` itself for F32; a copy with quantize→dequantize weights else).
    """
    import gguf

    config = model.config
    arch = "qwen2" if config.model_type == "qwen2" else "llama"  # llama.cpp converts Mistral as llama
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    quant = gguf.GGMLQuantizationType[qtype]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    tokens, merges, types = tiny_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)

    reference_state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        stored = array
        if quant != gguf.GGMLQuantizationType.F32 and array.ndim == 2:
            stored = gguf.quants.quantize(array, quant)  # (rows, bytes per row): rows stay whole
            reference_state[name] = torch.from_numpy(gguf.quants.dequantize(stored, quant).reshape(array.shape))
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            stored = llama_cpp_permute(stored, heads)  # reordering whole rows commutes with row-wise quantization
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            stored = llama_cpp_permute(stored, kv_heads)
        stored = np.ascontiguousarray(stored)
        writer.add_tensor(_gguf_name(name), stored, raw_dtype=quant if stored.dtype == np.uint8 else None)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, rope))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    if not reference_state:
        return model
    reference = copy.deepcopy(model)
    reference.load_state_dict(reference_state, strict=False)
    return reference
