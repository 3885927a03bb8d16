"""The native whole-model decode step (models/native_step.py, kernels/step.c) against the eager step it replaces,
on tiny random int4 models (bf16 compute): the same logits up to bf16 rounding, the same K/V written into the pool,
the same attention handed to the policy, on scattered block tables and on one or several threads."""

from __future__ import annotations

import pytest
import torch

import kvbound
from kvbound.config import CacheConfig
from kvbound.errors import ContextOverflowError
from kvbound.kvcache import native, storage
from kvbound.models.linear import Int8Linear
from kvbound.models.native_step import HEAD_INT4, HEAD_INT8, NativeStep
from tests.helpers_tiny import random_ids, save_hf_dir, tiny_case_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels are not built")

CASES = ["llama", "qwen2-gqa4", "llama-tied"]  # plain; q/k/v bias with 4 query heads per KV head; tied embedding


@pytest.fixture(scope="module", params=[(case, head) for case in CASES for head in ("int4", "int8")],
                ids=lambda p: f"{p[0]}-head-{p[1]}")
def llm(request, tmp_path_factory):
    """An int4 model; its output matrix int4 or int8 (kvbound's default: the GGUF's 8-bit embedding)."""
    case, head = request.param
    path = save_hf_dir(tiny_case_model(case), tmp_path_factory.mktemp(case))
    llm = kvbound.load(path, weights="int4")
    if head == "int8":
        model = llm.model
        name = "embed_tokens" if model.lm_head is None else "lm_head"
        dense = getattr(model, name).dequantize()
        setattr(model, name, Int8Linear(dense, None, torch.bfloat16, torch.device("cpu")))
    assert NativeStep.build(llm.model).desc.head_kind == {"int4": HEAD_INT4, "int8": HEAD_INT8}[head]
    return llm


def run(llm, native_on: bool, kv: str, policy: str, threads: int):
    """Two sequences sharing one pool, prefilled and decoded in turns (their block tables interleave); every decode
    step's logits, both pools' K/V rows and the first sequence's policy scores."""
    llm.model.native_decode = native_on
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pool = llm.shared_pool("4MiB", dtype=kv, block_size=8)
        a, b = (llm.new_cache(CacheConfig(tokens=200, dtype=kv, block_size=8, policy=policy), pool=pool)
                for _ in range(2))
        ids = random_ids(60, seed=3)
        for chunk in (ids[:13], ids[13:20], ids[20:41]):
            llm.runner.prefill(chunk, a)
            llm.runner.prefill(chunk[::-1], b)
        logits = []
        for i in range(19):  # past block boundaries
            for cache in (a, b):
                logits.append(llm.runner.decode(ids[41 + i], cache))
        assert not storage.consecutive(list(a.table))
        if a.spec.quantized:  # what the cache holds, dequantized (blocks and residual window)
            with torch.inference_mode():
                keys, values = (t.clone() for t in a._read(0, a.num_tokens, False))
        else:
            held = pool.read_blocks(list(a.table), a.num_tokens)
            keys, values = held["k"], held["v"]
        return torch.stack(logits), keys.float(), values.float(), a.view().scores.clone()
    finally:
        torch.set_num_threads(saved)
        llm.model.native_decode = True


@pytest.mark.parametrize("kv", ["bf16", "fp32", "int8", "int4"])
@pytest.mark.parametrize("policy,threads", [("none", 1), ("h2o", 1), ("none", 3)])
def test_native_step_matches_the_eager_step(llm, kv, policy, threads, monkeypatch):
    calls = []
    real = NativeStep.__call__
    monkeypatch.setattr(NativeStep, "__call__", lambda self, *a: calls.append(a[-1].rest) or real(self, *a))
    fast, fast_k, fast_v, fast_scores = run(llm, True, kv, policy, threads)
    # every decode step of both sequences went native, but for a quantized block's last token (41 + 19 tokens
    # in blocks of 8: positions 47 and 55 fill blocks)
    assert len(calls) == 2 * 19 - (4 if kv.startswith("int") else 0)
    slow, slow_k, slow_v, slow_scores = run(llm, False, kv, policy, threads)
    assert len(calls) == 2 * 19 - (4 if kv.startswith("int") else 0)
    # bf16 activations: the two paths round at the same points and differ in accumulation order only
    scale = slow.abs().max()
    assert (fast - slow).abs().max() / scale < 0.02
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.9
    assert torch.allclose(fast_k, slow_k, atol=0.05, rtol=0.02) and torch.allclose(fast_v, slow_v, atol=0.05,
                                                                                    rtol=0.02)
    if policy == "h2o":  # the policy saw each layer's attention from the native step too
        assert fast_scores.abs().sum() > 0
        assert torch.allclose(fast_scores, slow_scores, atol=0.02, rtol=0.05)


def test_uncovered_models_and_caches_take_the_eager_step(llm, monkeypatch):
    """A quantized block's last token and a multi-token step never reach the native step."""
    calls = []
    real = NativeStep.__call__
    monkeypatch.setattr(NativeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    cache = llm.new_cache(CacheConfig(tokens=64, dtype="int8", block_size=8))
    llm.runner.prefill(random_ids(7, seed=1), cache)
    llm.runner.decode(5, cache)
    assert calls == []  # int8 KV, the 8th token fills the block: decode_plan is None
    llm.runner.decode(5, cache)
    assert calls == [1]
    calls.clear()
    cache = llm.new_cache(CacheConfig(tokens=64))
    llm.runner.prefill(random_ids(10, seed=1), cache)
    assert calls == []  # a prefill step
    llm.runner.decode(5, cache)
    assert calls == [1]


def test_dense_weights_are_not_covered(tmp_path):
    llm = kvbound.load(save_hf_dir(tiny_case_model("llama"), tmp_path), weights="bf16")
    assert NativeStep.build(llm.model) is None


def test_a_decode_batch_takes_the_native_step_per_sequence_and_is_all_or_nothing(llm):
    """Runner.decode_batch over an int4 model: each row equals that sequence's own decode, and a cache that cannot
    take its token leaves every cache of the batch as it was."""

    def prefilled(seed: int, tokens: int = 64):
        cache = llm.new_cache(CacheConfig(tokens=tokens))
        llm.runner.prefill(random_ids(12, seed=seed), cache)
        return cache

    a, b = prefilled(1), prefilled(2)
    rows = llm.runner.decode_batch([3, 4], [a, b])
    assert torch.equal(rows[0], llm.runner.decode(3, prefilled(1)))
    assert torch.equal(rows[1], llm.runner.decode(4, prefilled(2)))
    full = prefilled(3, tokens=12)  # no eviction: a 13th token does not fit
    held = a.num_tokens
    with pytest.raises(ContextOverflowError):
        llm.runner.decode_batch([5, 6], [a, full])  # a takes its token first, then gives it back
    assert a.num_tokens == held and full.num_tokens == 12
    same_history = prefilled(1)
    llm.runner.decode(3, same_history)
    assert torch.equal(llm.runner.decode(7, a), llm.runner.decode(7, same_history))
