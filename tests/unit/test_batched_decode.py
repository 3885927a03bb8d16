"""A batched decode step (LlamaModel.forward_batch) gives each sequence what decoding it alone gives: sequences of
different lengths, in caches of their own or in one shared pool with interleaved blocks, with quantized KV and
with an evicting policy; every tiny model of the matrix. And the request protocol (engine/batch.py) that lets a
driver batch the decode steps of several generations without changing what any of them produces."""

from __future__ import annotations

import pytest
import torch

import kvbound
from kvbound.config import CacheConfig
from kvbound.kvcache import storage
from kvbound.engine import batch
from kvbound.engine.generate import Decoder
from kvbound.engine.sampler import SamplingParams
from kvbound.errors import ContextOverflowError
from tests.helpers_tiny import TINY_CASES, random_ids, save_hf_dir, tiny_case_model

LENGTHS = [1, 5, 17, 40]  # prompt lengths of the batch's sequences (different positions and block counts)
STEPS = 12
FP32_BOUND = 1e-4
# Quantized KV: a last-bit difference in a key or value (a B-row matmul rounds differently from a 1-row one) can
# round a stored code the other way, one quantization step on one value; measured ≤ 0.015 (int8), ≤ 0.01 (int4)
# on these models (|logits| ~ 5-20).
QUANTIZED_BOUNDS = {"int8": 0.05, "int4": 0.1}
# bf16: models match exactly on this CPU (measured 0; 0.05 with int8 KV), q/k/v bias (qwen2) included since the
# multi-row path adds the bias inside the GEMM (torch.addmm) as the single-row F.linear does.
BF16_BOUNDS: dict[str, float] = {}
BF16_BOUND = 0.1


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict:
    return {case: save_hf_dir(tiny_case_model(case), tmp_path_factory.mktemp(case)) for case in TINY_CASES}


def load(tiny_dirs, case: str, dtype: str = "fp32") -> kvbound.LLM:
    torch.set_num_threads(1)
    return kvbound.load(tiny_dirs[case], dtype=dtype, device="cpu")


def prefilled(llm, make_cache, lengths=LENGTHS) -> list:
    caches = []
    for i, n in enumerate(lengths):
        cache = make_cache()
        llm.runner.prefill(random_ids(n, seed=i), cache)
        caches.append(cache)
    return caches


def decode_both(llm, alone: list, batch: list, steps: int = STEPS) -> float:
    """Feed the same random tokens to each sequence alone and to the batch; the largest logit difference."""
    worst = 0.0
    for step in range(steps):
        tokens = random_ids(len(alone), seed=100 + step)
        ref = torch.stack([llm.runner.decode(t, c) for t, c in zip(tokens, alone)])  # (B, V)
        out = llm.runner.decode_batch(tokens, batch)  # (B, V)
        assert out.shape == ref.shape
        worst = max(worst, (out - ref).abs().max().item())
    for a, b in zip(alone, batch):
        assert a.num_tokens == b.num_tokens
        assert torch.equal(a.view().positions, b.view().positions)
    return worst


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_batch_matches_each_sequence_alone(tiny_dirs, case) -> None:
    llm = load(tiny_dirs, case)
    make = lambda: llm.new_cache(CacheConfig(tokens=128))  # noqa: E731
    err = decode_both(llm, prefilled(llm, make), prefilled(llm, make))
    assert err <= FP32_BOUND, f"{case}: batched decode differs by {err}"


def test_a_batch_of_one_is_the_plain_decode(tiny_dirs) -> None:
    llm = load(tiny_dirs, "llama")
    make = lambda: llm.new_cache(CacheConfig(tokens=128))  # noqa: E731
    assert decode_both(llm, prefilled(llm, make, [9]), prefilled(llm, make, [9])) == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_batch_over_one_shared_pool(tiny_dirs, dtype) -> None:
    """The sequences share one pool and their tables interleave (no sequence reads its keys as one view); the
    decode steps cross block boundaries (lengths 30/31 with 32-token blocks: quantized caches store a block)."""
    llm = load(tiny_dirs, "llama")

    def interleaved() -> list:
        pool = llm.shared_pool("4MiB", dtype=dtype)
        caches = [llm.new_cache(CacheConfig(dtype=dtype), pool=pool) for _ in range(3)]
        for rnd in range(3):  # a block per sequence in turn: tables like [0, 3, 6], [1, 4, 7], ...
            for i, cache in enumerate(caches):
                llm.runner.prefill(random_ids([30, 32, 31][i] if rnd == 2 else 32, seed=10 * rnd + i), cache)
        return caches

    alone, batch = interleaved(), interleaved()
    assert not storage.consecutive(list(batch[0].table))
    err = decode_both(llm, alone, batch, steps=4)
    assert err <= QUANTIZED_BOUNDS.get(dtype, FP32_BOUND), f"{dtype}: batched decode differs by {err}"


@pytest.mark.parametrize("policy", ["window", "h2o"])
def test_batch_with_an_evicting_policy(tiny_dirs, policy) -> None:
    """Caches that fill up mid-batch evict in `begin` (h2o from the attention each step observes) exactly as alone."""
    llm = load(tiny_dirs, "llama")
    make = lambda: llm.new_cache(CacheConfig(tokens=48, policy=policy))  # noqa: E731
    alone, batch = prefilled(llm, make, [44, 30, 47]), prefilled(llm, make, [44, 30, 47])
    err = decode_both(llm, alone, batch, steps=20)
    assert err <= FP32_BOUND, f"{policy}: batched decode differs by {err}"
    assert all(c.evicted_total > 0 for c in batch)
    assert [c.evicted_total for c in alone] == [c.evicted_total for c in batch]


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_bf16_batch_within_bound(tiny_dirs, case) -> None:
    llm = load(tiny_dirs, case, dtype="bf16")
    for kv in ("auto", "int8"):
        make = lambda: llm.new_cache(CacheConfig(tokens=128, dtype=kv))  # noqa: E731
        err = decode_both(llm, prefilled(llm, make), prefilled(llm, make))
        assert err <= BF16_BOUNDS.get(case, BF16_BOUND), f"{case}/{kv}: bf16 batched decode differs by {err}"


def test_a_cache_that_cannot_take_the_token_leaves_every_cache_as_it_was(tiny_dirs) -> None:
    llm = load(tiny_dirs, "llama")
    pool = llm.shared_pool("1MiB")
    room = llm.new_cache(CacheConfig(), pool=pool)
    full = llm.new_cache(CacheConfig(tokens=8), pool=pool)  # no eviction: the 9th token does not fit
    llm.runner.prefill(random_ids(20, seed=1), room)
    llm.runner.prefill(random_ids(8, seed=2), full)
    free, held = pool.free_blocks, room.num_tokens
    with pytest.raises(ContextOverflowError):
        llm.runner.decode_batch([3, 4], [room, full])
    assert room.num_tokens == held and full.num_tokens == 8 and pool.free_blocks == free
    with pytest.raises(ValueError, match="cache of its own"):
        llm.runner.decode_batch([3, 4], [room, room])
    reference = llm.new_cache(CacheConfig(tokens=64))
    llm.runner.prefill(random_ids(20, seed=1), reference)
    assert torch.equal(llm.runner.decode_batch([3], [room])[0], llm.runner.decode(3, reference))


# -- decoders stepped together --------------------------------------------------------------------------------------
def decoder(llm, prompt_seed: int, max_new_tokens: int = 10) -> Decoder:
    ids = random_ids(6 + prompt_seed, seed=prompt_seed)
    cache = llm.new_cache(CacheConfig(tokens=64))
    logits = llm.runner.prefill(ids, cache)
    return Decoder(llm.runner, llm.tokenizer, cache, logits,
                   SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), ids)


def test_decoders_stepped_together_match_each_alone(tiny_dirs) -> None:
    llm = load(tiny_dirs, "llama")
    expected = []
    for seed in range(3):
        alone = decoder(llm, seed, max_new_tokens=4 + 3 * seed)
        text = ""
        while not alone.done:
            text += alone.step()
        expected.append((alone.result.token_ids, alone.result.text, text))
    together = [decoder(llm, seed, max_new_tokens=4 + 3 * seed) for seed in range(3)]
    texts = ["", "", ""]
    sizes = batch.drive(together, lambda i, piece: texts.__setitem__(i, texts[i] + piece))
    assert [(d.result.token_ids, d.result.text, t) for d, t in zip(together, texts)] == expected
    assert sizes[0] == 3 and sizes[-1] == 1  # the longest runs alone once the others finished
    assert sum(sizes) == sum(len(ids) for ids, _, _ in expected)


def test_a_failed_batch_steps_each_alone_and_the_error_stays_with_its_sequence(tiny_dirs) -> None:
    """One cache with no room in the batch: the batch commits nothing, the other sequences still get every
    token, and the full one ends with finish_reason context_full."""
    llm = load(tiny_dirs, "llama")
    reference = decoder(llm, 1, max_new_tokens=6)
    while not reference.done:
        reference.step()
    ids = random_ids(8, seed=2)
    full = llm.new_cache(CacheConfig(tokens=9))  # room for one more token, then no eviction
    stuck = Decoder(llm.runner, llm.tokenizer, full, llm.runner.prefill(ids, full),
                    SamplingParams(max_new_tokens=6, temperature=0.0), ids)
    other = decoder(llm, 1, max_new_tokens=6)
    outcomes, sizes = batch.step([other, stuck])
    assert sizes == [2] and all(o.error is None for o in outcomes)
    batch.drive([other, stuck])
    assert stuck.result.finish_reason == "context_full" and full.num_tokens == 9
    assert other.result.token_ids == reference.result.token_ids
