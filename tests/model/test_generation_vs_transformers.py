"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in kvbound vs transformers loading the same file, both
fp32: greedy tokens on chat prompts, a multi-turn Chat that prefills only each turn's new tokens, full logits.

transformers dequantizes the GGUF with the same `gguf` package and un-permutes Q/K itself, so both run the same
weights; prompts are rendered and tokenized by kvbound once and fed as ids to both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.kvcache import ContiguousCache
from tests.helpers_tiny import reference_greedy, reference_logits

pytestmark = pytest.mark.model

AUSTEN = Path(__file__).resolve().parents[2] / "data" / "texts" / "prideprejudice.txt"
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_gguf: Path):
    return kvbound.load(smollm2_gguf, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def hf(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def austen_ids(llm) -> list[int]:
    """The novel's opening, cut at a line break once it reaches 1500 tokens."""
    text, ids = "", []
    for line in AUSTEN.read_text(encoding="utf-8").splitlines(keepends=True):
        text += line
        if line == "\n" and len(ids := llm.tokenizer.encode(text)) >= 1500:
            return ids
    raise AssertionError(f"{AUSTEN} is shorter than 1500 tokens")


def conversation(name: str, llm, austen_ids: list[int]) -> list[dict[str, str]]:
    if name == "short":
        return [{"role": "user", "content": "What is the capital of France?"}]
    if name == "austen":
        passage = llm.tokenizer.decode(austen_ids)
        return [{"role": "user", "content": f"{passage}\n\nWho has taken Netherfield Park, and what does Mrs. Bennet "
                                            "hope will come of it?"}]
    if name == "multi-turn":
        return [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three primary colours."},
                {"role": "assistant", "content": "Red, yellow and blue."},
                {"role": "user", "content": "Which of them is the colour of the sky on a clear day, and why?"}]
    if name == "digits":
        return [{"role": "user", "content": "Add 48213 and 90577, then multiply 3.14159 by 2.71828. The invoice "
                                            "numbers are 2024-0193, 2024-0207 and 2024-1158; list them in order."}]
    raise ValueError(name)


@pytest.mark.parametrize("name", ["short", "austen", "multi-turn", "digits"])
def test_greedy_tokens_match_transformers(name: str, llm, hf, austen_ids: list[int]) -> None:
    text = llm.tokenizer.apply_chat_template(conversation(name, llm, austen_ids))
    ids = llm.tokenizer.encode(text)
    assert llm.tokenizer.encode(text, add_special=True) == ids  # raw generation feeds exactly these ids
    reply = llm.generate(text, raw=True, temperature=0.0, max_new_tokens=NEW_TOKENS)
    assert reply.prompt_tokens == len(ids)
    assert reply.token_ids == reference_greedy(hf, ids, NEW_TOKENS, llm.tokenizer.stop_ids)


def test_chat_second_turn_matches_full_history(llm, hf) -> None:
    """Turn 2 prefills only the text added since turn 1, onto the cache turn 1 left; transformers re-reads the
    whole re-rendered conversation. Same greedy tokens means the cache held exactly that conversation."""
    chat = llm.chat()
    first = chat.send("What is the capital of France?", temperature=0.0, max_new_tokens=NEW_TOKENS)
    assert first.finish_reason == "stop"  # the reply closed its turn, so the history re-renders as it was fed
    second = chat.send("And what is the capital of Italy? Answer in one sentence.", temperature=0.0,
                       max_new_tokens=NEW_TOKENS)
    history = chat.messages[:-1]  # system/user/assistant/user: what turn 2 was asked on
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history))
    assert second.reprefilled_tokens == 0
    assert first.context_tokens + second.prompt_tokens == len(ids)  # only the new tokens were prefilled
    assert second.token_ids == reference_greedy(hf, ids, NEW_TOKENS, llm.tokenizer.stop_ids)


def test_full_logits_match_transformers(llm, hf, austen_ids: list[int]) -> None:
    ids = austen_ids[:600]
    cache = ContiguousCache(llm.config, len(ids), dtype=torch.float32)
    ours = llm.model(torch.tensor([ids]), cache, all_logits=True)[0]
    assert (ours - reference_logits(hf, ids)).abs().max().item() <= 1e-3
