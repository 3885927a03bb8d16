"""Tiny random-weight Llama / Qwen2 / Mistral checkpoints through kvbound's loaders, model and KV cache, against
transformers in fp32: logits, chunked prefill, token-by-token decode, GGUF (F32 and quantized) round trips."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.engine.runner import Runner
from kvbound.kvcache import ContiguousCache
from kvbound.loading import open_checkpoint
from kvbound.models.llama import LlamaModel
from tests.helpers_tiny import (TINY_CASES, random_ids, reference_greedy, reference_logits, save_hf_dir,
                                tiny_case_model, tiny_hf_model, write_gguf)

SEQ = 40
SPLIT = 30  # prefill 30 tokens (4 chunks of 7 + 2), then decode the last 10
TOL = 1e-4  # fp32: measured differences are ~6e-6 on logits of magnitude ~7


def load_ours(path: Path) -> LlamaModel:
    checkpoint = open_checkpoint(path)
    return LlamaModel.from_tensors(checkpoint.config, checkpoint.tensors(torch.float32))


def full_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """kvbound's logits (T, V) for `ids` in one forward pass over a fresh cache."""
    cache = ContiguousCache(model.config, len(ids))
    return model(torch.tensor([ids]), cache, all_logits=True)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_loads_like_transformers(hf, path: Path) -> None:
    ids = random_ids(SEQ, seed=1)
    assert max_diff(full_logits(load_ours(path), ids), reference_logits(hf, ids)) <= TOL


@dataclass
class Built:
    case: str
    hf: object  # the transformers model
    ours: LlamaModel
    ids: list[int]
    reference: torch.Tensor  # transformers' logits (SEQ, V)


@pytest.fixture(scope="module", params=list(TINY_CASES))
def built(request, tmp_path_factory) -> Built:
    hf = tiny_case_model(request.param)
    ours = load_ours(save_hf_dir(hf, tmp_path_factory.mktemp(request.param)))
    ids = random_ids(SEQ, seed=1)
    return Built(request.param, hf, ours, ids, reference_logits(hf, ids))


# ---- safetensors directory ------------------------------------------------------------------------------------


def test_config_read_from_config_json(built: Built) -> None:
    hf, config = built.hf.config, built.ours.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        hf.hidden_size // hf.num_attention_heads, hf.vocab_size)
    assert config.attention_bias == (hf.model_type == "qwen2")
    assert config.tie_embeddings == hf.tie_word_embeddings
    assert (built.ours.lm_head is None) == hf.tie_word_embeddings


def test_logits_match_transformers(built: Built) -> None:
    assert max_diff(full_logits(built.ours, built.ids), built.reference) <= TOL


def test_chunked_prefill_then_decode_matches_full_forward(built: Built) -> None:
    full = full_logits(built.ours, built.ids)
    runner = Runner(built.ours, chunk=7)
    cache = ContiguousCache(built.ours.config, SEQ)
    last = runner.prefill(built.ids[:SPLIT], cache)
    assert cache.num_tokens == SPLIT
    assert max_diff(last, full[SPLIT - 1]) <= TOL
    for i in range(SPLIT, SEQ):
        assert max_diff(runner.decode(built.ids[i], cache), full[i]) <= TOL, f"decode step at position {i}"
    assert cache.num_tokens == SEQ


def test_token_by_token_decode_matches_full_forward(built: Built) -> None:
    full = full_logits(built.ours, built.ids)
    runner = Runner(built.ours)
    cache = ContiguousCache(built.ours.config, SEQ)
    for i, token in enumerate(built.ids):
        assert max_diff(runner.decode(token, cache), full[i]) <= TOL, f"decode step at position {i}"


def test_cache_holds_kv_heads_only(built: Built) -> None:
    hf = built.hf.config
    layers, kv_heads, head_dim = hf.num_hidden_layers, hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
    capacity = 64
    cache = ContiguousCache(built.ours.config, capacity, dtype=torch.float32)
    Runner(built.ours, chunk=7).prefill(built.ids, cache)
    assert cache.k.shape == cache.v.shape == (layers, kv_heads, capacity, head_dim)
    assert cache.nbytes == 2 * layers * kv_heads * capacity * head_dim * 4


@pytest.mark.parametrize("case", ["qwen2-gqa4", "llama3-rope"])  # rope_theta 1e6; llama3 scaling
def test_transformers5_config_layout(case: str, tmp_path: Path) -> None:
    """config.json as transformers 5 writes it: RoPE settings nested in `rope_parameters`."""
    hf = tiny_case_model(case)
    assert_loads_like_transformers(hf, save_hf_dir(hf, tmp_path, config_layout="transformers5"))


# ---- GGUF -----------------------------------------------------------------------------------------------------


def fused_state(hf) -> dict[str, torch.Tensor]:
    """transformers' weights under our names: q/k/v and gate/up stacked along the output rows."""
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name in list(state):
        for parts, fused in ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj")):
            if f".{parts[0]}." in name:
                names = [name.replace(parts[0], p) for p in parts]
                state[name.replace(parts[0], fused)] = torch.cat([state.pop(n) for n in names])
    return state


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_gguf_f32_round_trip(case: str, tmp_path: Path) -> None:
    """An F32 GGUF written like llama.cpp's converter (Q/K rows permuted for llama) loads to the exact HF
    weights, which proves the un-permutation, and gives transformers' logits."""
    hf = tiny_case_model(case)
    write_gguf(hf, tmp_path / "tiny.gguf")
    checkpoint = open_checkpoint(tmp_path / "tiny.gguf")
    assert checkpoint.config.tie_embeddings == hf.config.tie_word_embeddings
    ours = LlamaModel.from_tensors(checkpoint.config, checkpoint.tensors(torch.float32))
    state = fused_state(hf)
    assert {name for name, _ in ours.named_parameters()} == set(state)
    for name, param in ours.named_parameters():
        assert torch.equal(param, state[name]), name
    ids = random_ids(SEQ, seed=1)
    assert max_diff(full_logits(ours, ids), reference_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("case", ["llama", "qwen2-gqa4"])
def test_gguf_quantized_matches_dequantized_reference(case: str, qtype: str, tmp_path: Path) -> None:
    hf = tiny_case_model(case)
    reference = write_gguf(hf, tmp_path / "tiny.gguf", qtype)
    checkpoint = open_checkpoint(tmp_path / "tiny.gguf")
    matrices = sum(1 for p in hf.parameters() if p.ndim == 2)
    assert checkpoint.tensor_types[qtype] == matrices
    ids = random_ids(SEQ, seed=1)
    expected = reference_logits(reference, ids)
    assert max_diff(expected, reference_logits(hf, ids)) > 0.1  # the quantization is real, so the check has teeth
    ours = LlamaModel.from_tensors(checkpoint.config, checkpoint.tensors(torch.float32))
    assert max_diff(full_logits(ours, ids), expected) <= TOL


# ---- load() end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_load_greedy_matches_transformers(fmt: str, tmp_path: Path) -> None:
    """The public path (tokenizer from the files, the cache load() builds, the decode loop) on a tiny model."""
    hf = tiny_case_model("llama")
    path = save_hf_dir(hf, tmp_path) if fmt == "safetensors" else tmp_path / "tiny.gguf"
    if fmt == "gguf":
        write_gguf(hf, path)
    llm = kvbound.load(path, dtype="fp32", device="cpu")
    prompt = "the rain in spain stays mainly on the plain"
    ids = llm.tokenizer.encode(prompt, add_special=True)
    reply = llm.generate(prompt, raw=True, temperature=0.0, max_new_tokens=16)
    assert reply.token_ids == reference_greedy(hf, ids, 16, llm.tokenizer.stop_ids)


# ---- gaps found by these tests, now fixed ------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_projection_biases(bias: str, tmp_path: Path) -> None:
    hf = tiny_hf_model("llama", **{bias: True})
    assert_loads_like_transformers(hf, save_hf_dir(hf, tmp_path))


def test_mistral_sliding_window(tmp_path: Path) -> None:
    hf = tiny_hf_model("mistral", sliding_window=16)
    assert_loads_like_transformers(hf, save_hf_dir(hf, tmp_path))
