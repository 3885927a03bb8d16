"""Recall for a raw prompt (chat/passages.py): a passkey the cache evicted comes back before the question, inside the
budget; the cuts keep sentences whole and cover the prompt once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvbound
from kvbound.chat import passages
from kvbound.config import CacheConfig

CASES = Path(__file__).resolve().parents[2] / "data" / "passkey" / "dev-classic.jsonl"


def test_cuts_cover_the_prompt_once_and_keep_sentences_whole():
    ends = list(range(6, 1000, 7))  # a sentence ends every 7 tokens
    segments, parts, tail = passages.split(1000, ends, tail_tokens=64)
    assert segments[0][0] == 0 and segments[-1][1] == tail and 1000 - tail <= 64
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))  # contiguous, no overlap
    cuts = {e + 1 for e in ends}
    for (start, stop), spans in zip(segments, parts):
        assert spans[0][0] == start and spans[-1][1] == stop
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(passages.PASSAGE_MIN <= b - a <= passages.PASSAGE_MAX for a, b in spans[:-1])
        assert all(b in cuts for _, b in spans), "a passage ends where a sentence ends"
        assert passages.SEGMENT_MIN <= stop - start <= passages.SEGMENT_MAX or stop == tail
    assert tail in cuts
    # no sentence end at all: hard cuts, still covering everything once
    segments, parts, tail = passages.split(300, [], tail_tokens=64)
    assert tail == 236 and [s for p in parts for s in p][-1][1] == 236


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return kvbound.load(smollm2_gguf, dtype="fp32", device="cpu")


def test_sentence_ends_follow_the_text(llm):
    text = "The sky is blue. Is it? Yes!\nDone"
    ids = llm.tokenizer.encode(text, add_special=True)
    ends = passages.sentence_ends(llm.tokenizer, text, ids)
    pieces = [llm.tokenizer.decode(ids[:e + 1]) for e in ends]
    assert [p.rstrip()[-1] for p in pieces] == [".", "?", "!"]


def test_a_raw_prompt_recalls_the_evicted_passkey_within_its_budget(llm):
    case = json.loads(CASES.read_text().splitlines()[0])  # ~540 tokens, the key near the start
    n = len(llm.tokenizer.encode(case["prompt"], add_special=True))
    config = CacheConfig(tokens=n // 8, policy="window")  # the key is far out of the window
    budget = llm.new_cache(config).reserved_bytes
    off = llm.generate(case["prompt"], raw=True, cache=config, recall="off", max_new_tokens=8, temperature=0)
    on = llm.generate(case["prompt"], raw=True, cache=config, recall="on", max_new_tokens=8, temperature=0)
    assert str(case["answer"]) not in off.text and off.recall == {}
    assert str(case["answer"]) in on.text, on.text
    start, stop = on.recall["spans"][0]
    assert str(case["answer"]) in llm.tokenizer.decode(llm.tokenizer.encode(case["prompt"], add_special=True)[start:stop])
    assert on.recall["passages"] >= 1 and 0 < on.recall["tokens"] <= n // 8 // passages.RAW_RECALL_SHARE
    assert on.kv_bytes <= budget and on.context_tokens <= n // 8
    assert on.receipt["evicted_tokens"] > 0


def test_raw_recall_is_a_no_op_when_nothing_is_evicted(llm):
    reply = llm.generate("The sky is blue. What colour is the sky?", raw=True, recall="on", max_new_tokens=2)
    assert reply.recall["passages"] == 0
    with pytest.raises(ValueError, match="recall"):
        llm.generate("hi", raw=True, recall="sometimes")
