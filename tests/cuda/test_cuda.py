"""CUDA paths: run where a GPU is present (skipped elsewhere). Same checks as on CPU, on the device."""

from __future__ import annotations

import pytest
import torch

import kvbound
from kvbound.config import CacheConfig
from kvbound.kvcache.contiguous import ContiguousCache
from tests.helpers_tiny import random_ids, reference_logits, save_hf_dir, tiny_hf_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = tiny_hf_model("qwen2", num_key_value_heads=1, max_position_embeddings=4096)
    return save_hf_dir(model, tmp_path_factory.mktemp("tiny")), model


def feed(llm, cache, ids, chunk=32):
    return torch.cat([llm.runner.score(ids[i:i + chunk], cache) for i in range(0, len(ids), chunk)])


def test_cuda_fp32_matches_transformers(tiny_dir):
    path, hf = tiny_dir
    llm = kvbound.load(path, dtype="fp32", device="cuda")
    ids = random_ids(200, seed=5)
    ref = reference_logits(hf, ids)
    out = feed(llm, llm.new_cache(), ids).cpu()
    assert (out - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_half_close_to_fp32(tiny_dir, dtype):
    path, _ = tiny_dir
    ref_llm = kvbound.load(path, dtype="fp32", device="cuda")
    llm = kvbound.load(path, dtype=dtype, device="cuda")
    ids = random_ids(200, seed=6)
    ref = feed(ref_llm, ref_llm.new_cache(), ids)
    out = feed(llm, llm.new_cache(), ids)
    rel = ((out - ref).abs().mean() / ref.abs().mean()).item()
    assert rel < 0.05, f"{dtype}: mean relative logit error {rel}"


@pytest.mark.parametrize("kv", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("policy", ["none", "window", "h2o", "snapkv", "tova", "turns+h2o"])
def test_cuda_cache_matrix(tiny_dir, kv, policy):
    path, _ = tiny_dir
    llm = kvbound.load(path, dtype="fp32", device="cuda")
    ids = random_ids(300, seed=7)
    ref = feed(llm, ContiguousCache(llm.config, 512, device="cuda"), ids)
    big = llm.new_cache(CacheConfig(tokens=1024, dtype=kv, policy=policy))
    out = feed(llm, big, ids)
    bound = {"fp32": 1e-4, "bf16": 0.3, "int8": 0.5, "int4": 6.0}[kv]
    assert (out - ref).abs().max().item() <= bound
    if policy != "none":
        small = llm.new_cache(CacheConfig(tokens=128, dtype=kv, policy=policy))
        small.set_segment(0, pinned={0})
        feed(llm, small, ids[:20])
        small.set_segment(1, pinned={0})
        feed(llm, small, ids[20:])
        assert small.num_tokens <= 128 and small.segment_tokens(0) == 20
        assert small.pool.k.is_cuda


def test_cuda_chat_generates(tiny_dir):
    path, _ = tiny_dir
    llm = kvbound.load(path, device="cuda")  # auto: bf16 on CUDA
    assert llm.dtype_name == "bf16"
    chat = llm.chat(system="be brief", tokens=256, policy="turns+h2o", dtype="int8")
    for turn in range(20):
        reply = chat.send("tea and rain in the hills " * 3, max_new_tokens=5, temperature=0.8, seed=turn)
        assert reply.context_tokens <= 256


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_cuda_quantized_weights_match_the_cpu(tiny_dir, weights):
    """int8 (`_weight_int8pack_mm` or its dequantizing fallback) and int4 (tinygemm `_weight_int4pack_mm`, with the
    embedding's nibbles kept for lookups) on the device compute the same quantized model as the CPU kernels."""
    from kvbound.models.linear import Int4Linear

    path, _ = tiny_dir
    ids = random_ids(100, seed=6)
    gpu = kvbound.load(path, weights=weights, device="cuda")
    cpu = kvbound.load(path, weights=weights, device="cpu")
    assert gpu.model.weights_bytes() == gpu.plan.nbytes(gpu.config)
    out_gpu = feed(gpu, gpu.new_cache(), ids).float().cpu()
    out_cpu = feed(cpu, cpu.new_cache(), ids).float()
    assert (out_gpu - out_cpu).abs().max() / out_cpu.abs().max() <= 0.07  # bf16 activations on both devices
    if weights == "int4":
        emb = gpu.model.embed_tokens
        assert isinstance(emb, Int4Linear) and emb.nibbles is not None
        pick = torch.tensor([[0, 5, 127]])
        assert torch.allclose(emb.rows(pick.cuda()).float().cpu(), cpu.model.embed_tokens.rows(pick).float(),
                              atol=0.05)


def test_cuda_compiled_decode_with_cuda_graphs_equals_eager(tiny_dir):
    """compile=True on CUDA: the two halves of each block replay as CUDA graphs (reduce-overhead); the outputs are
    copied before the next replay overwrites them, so greedy decoding gives eager's tokens."""
    path, _ = tiny_dir
    ids = random_ids(60, seed=8)
    runs = []
    for compiled in (False, True):
        llm = kvbound.load(path, dtype="bf16", device="cuda", compile=compiled)
        cache = llm.new_cache(CacheConfig(tokens=100))
        token, tokens, rows = int(torch.argmax(llm.runner.prefill(ids, cache))), [], []
        for _ in range(16):
            logits = llm.runner.decode(token, cache)
            rows.append(logits.float().cpu())
            token = int(torch.argmax(logits))
            tokens.append(token)
        runs.append((tokens, torch.stack(rows)))
    assert runs[1][0] == runs[0][0]
    assert (runs[1][1] - runs[0][1]).abs().max().item() <= 0.25
