"""Weight storage modes on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF with a Q8_0 embedding): greedy
agreement with the dense fp32 path and perplexity deltas on a public-domain book."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.engine.perplexity import perplexity

BOOK = Path(__file__).resolve().parents[2] / "data" / "texts" / "prideprejudice.txt"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32(smollm2_gguf):
    return kvbound.load(smollm2_gguf, weights="fp32", device="cpu")


@pytest.fixture(scope="module")
def text() -> str:
    return BOOK.read_text(encoding="utf-8")[20000:32000]


@pytest.mark.model
def test_auto_keeps_the_file_quantized(smollm2_gguf) -> None:
    llm = kvbound.load(smollm2_gguf, device="cpu")
    info = llm.info()
    assert info.weights_storage == {"int4": 120, "int8": 1} and info.dtype == "bf16"
    # The goal of the issue: weights in memory within 1.2x of the file's tensor bytes (measured 0.98x).
    assert info.weights_bytes <= 1.2 * llm.checkpoint.file_tensor_bytes


@pytest.mark.model
def test_int8_greedy_agrees_with_fp32(smollm2_gguf, fp32) -> None:
    """The first 32 greedy tokens: identical on a factual prompt; on a poem, bf16 activations alone (dense bf16
    weights) leave fp32's path at token 28, so there we check the next-token choice along fp32's own tokens
    (teacher forcing), which a divergence cannot cascade through: at least 90% agree (measured 30 of 32; the two
    misses are near-ties at bf16 precision)."""
    int8 = kvbound.load(smollm2_gguf, weights="int8", device="cpu")
    want = fp32.generate(PROMPTS[0], temperature=0, max_new_tokens=32).token_ids
    assert int8.generate(PROMPTS[0], temperature=0, max_new_tokens=32).token_ids == want
    for prompt in PROMPTS:
        generated = fp32.generate(prompt, temperature=0, max_new_tokens=32).token_ids
        ids = fp32.tokenizer.encode(fp32.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True)) + generated
        choices = [int8.runner.score(ids, int8.new_cache(tokens=len(ids)))[len(ids) - len(generated) - 1:-1]
                   .argmax(-1), fp32.runner.score(ids, fp32.new_cache(tokens=len(ids)))[len(ids) - len(generated) - 1:-1]
                   .argmax(-1)]
        assert torch.equal(choices[1], torch.tensor(generated))  # the reference reproduces itself
        assert int((choices[0] == choices[1]).sum()) >= 0.9 * len(generated), prompt


@pytest.mark.model
def test_perplexity_deltas(smollm2_gguf, fp32, text) -> None:
    """int8 within 1% of dense fp32; the file's own 4-bit values (auto) within 0.3% of the same values dequantized
    to dense bf16 (0.3%) — the storage changes the bytes, not the model. Measured on 2,047 tokens: bf16 +0.10%, auto +0.01%
    over bf16, int8 +0.53%."""
    def ppl(llm) -> float:
        return perplexity(llm, text, max_tokens=2048).ppl

    base = ppl(fp32)
    assert ppl(kvbound.load(smollm2_gguf, weights="int8", device="cpu")) <= base * 1.01
    dense_bf16 = ppl(kvbound.load(smollm2_gguf, weights="bf16", device="cpu"))
    assert abs(ppl(kvbound.load(smollm2_gguf, device="cpu")) / dense_bf16 - 1) <= 0.003
