"""The compiled decode step (`load(..., compile=True)`) gives the eager step's tokens and logits: on a tiny random
Llama with int4 weights computing in bf16 (the default path's kernels) and with dense fp32, and through a chat.
One graph per half-block serves every layer (no recompile per layer)."""

from __future__ import annotations

import pytest
import torch

import kvbound
from kvbound.config import CacheConfig
from tests.helpers_tiny import random_ids, save_hf_dir, tiny_hf_model

STEPS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = tiny_hf_model("llama", num_key_value_heads=2, intermediate_size=128)
    return save_hf_dir(model, tmp_path_factory.mktemp("tiny"))


def decode(llm: kvbound.LLM, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    cache = llm.new_cache(CacheConfig(tokens=len(ids) + STEPS + 1))
    logits = llm.runner.prefill(ids, cache)
    tokens, rows = [], []
    for _ in range(STEPS):
        token = int(torch.argmax(logits))
        tokens.append(token)
        logits = llm.runner.decode(token, cache)
        rows.append(logits.float())
    cache.free()
    return tokens, torch.stack(rows)


# bf16: inductor keeps a fused region's intermediates in fp32 where eager rounds each op's result to bf16, so the
# logits differ by a few bf16 steps (measured ≤ 0.12 at |logits| ~ 3, where a step is 0.016); the tokens agree.
@pytest.mark.parametrize("weights,dtype,bound", [("fp32", "fp32", 1e-4), ("int4", "bf16", 0.25)])
def test_compiled_decode_equals_eager(tiny_dir, weights, dtype, bound):
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    eager = kvbound.load(tiny_dir, weights=weights, dtype=dtype, device="cpu")
    compiled = kvbound.load(tiny_dir, weights=weights, dtype=dtype, device="cpu", compile=True)
    assert eager.model.compiled is None and compiled.model.compiled is not None
    ids = random_ids(40, seed=3)
    tokens, logits = decode(eager, ids)
    got_tokens, got_logits = decode(compiled, ids)
    assert got_tokens == tokens
    assert (got_logits - logits).abs().max().item() <= bound
    assert counters["stats"]["unique_graphs"] <= 2  # the two halves, shared by both layers


def test_compile_flag_is_validated_and_a_chat_runs_compiled(tiny_dir):
    with pytest.raises(ValueError, match="compile must be True or False"):
        kvbound.load(tiny_dir, device="cpu", compile="yes")
    llm = kvbound.load(tiny_dir, device="cpu", compile=True)
    reply = llm.chat().send("hello", max_new_tokens=6, temperature=0)
    eager = kvbound.load(tiny_dir, device="cpu").chat().send("hello", max_new_tokens=6, temperature=0)
    assert reply.token_ids == eager.token_ids
