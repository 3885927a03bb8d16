"""Recall: the archive of evicted turns (FTS5, BM25, a byte cap) and a chat that brings the matching turn back for
one turn, inside its KV budget, and leaves its transcript as if nothing had been recalled."""

from __future__ import annotations

import random

import pytest
import torch

import kvbound
from kvbound.chat.archive import Archive, Passage
from kvbound.chat.session import RECALL_PREFIX, RECALL_SEGMENT, Chat, recall_message
from kvbound.chat.transcript import turn_record
from tests.helpers_tiny import save_hf_dir, tiny_hf_model

FILLER = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "walk", "garden", "bonnet", "carriage"]


def test_archive_ranks_the_turn_that_holds_the_fact_first():
    archive = Archive()
    archive.add(1, "User: My locker code is 4417. Please remember it.\nAssistant: I will.")
    archive.add(2, "User: Tell me about the weather in the hills.\nAssistant: Rainy.")
    archive.add(3, "User: What is a good name for a cat?\nAssistant: Tom.")
    hits = archive.search("What is my locker code?")
    assert hits and hits[0].key == 1
    assert archive.search("what is my") == []  # only stopwords: nothing to look for
    # a long message that shares one word with a turn by chance recalls nothing
    assert archive.search("Tell me about the locker room by the river, the gym and the stadium") == []
    assert archive.search('"NEAR( locker* OR -code') and archive.search("") == []  # FTS syntax is quoted away


def test_archive_keeps_its_cap_dropping_the_oldest():
    archive = Archive(cap_bytes=1000)
    for turn in range(1, 101):
        archive.add(turn, f"turn {turn} says " + "word " * 20)
    assert archive.nbytes <= 1000 and archive.dropped > 0
    assert max(archive.keys()) == 100 and min(archive.keys()) > 1
    copy = Archive(cap_bytes=1000)
    copy.restore(archive.export())
    assert copy.keys() == archive.keys() and copy.nbytes == archive.nbytes
    archive.add(100, "replaced")
    assert [t for k, t in archive.export() if k == 100] == ["replaced"]
    with pytest.raises(ValueError, match="cap"):
        Archive(cap_bytes=0)


def test_a_recalled_turn_comes_back_in_the_users_words_oldest_first():
    turns = [Passage(7, turn_record("My locker code is 4417.", "The code of the character is 9999."), 2.0),
             Passage(2, turn_record("I live in Whitby.", "Assistant: noted.\nUser: and more"), 1.0)]
    [message] = recall_message(turns)
    assert message["role"] == "system"
    assert message["content"] == RECALL_PREFIX + "I live in Whitby.\n\nMy locker code is 4417."
    assert recall_message([]) == []
    tokenizer = type("T", (), {"encode": staticmethod(lambda text: text.split())})
    archive = Archive()
    archive.add(1, turns[0].text)
    # sized by what comes back: its first line (6 words) and the blank line fit 8 tokens, the whole turn does not
    assert [p.key for p in archive.recall("locker code", tokenizer, 8, shown=lambda t: t.split("\n")[0])] == [1]
    assert archive.recall("locker code", tokenizer, 8) == []


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    path = save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path_factory.mktemp("tiny"))
    return kvbound.load(path, dtype="fp32", device="cpu")


def filler(rng: random.Random) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(rng.randint(8, 20)))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_a_chat_recalls_an_evicted_turn_for_one_turn(llm, dtype):
    chat = llm.chat(system="be brief", tokens=960, dtype=dtype, policy="turns")
    assert chat.archive is not None  # auto: on, since the policy evicts
    budget = chat.cache.reserved_bytes
    chat.send("my locker code is 4417", max_new_tokens=4, temperature=0.0)
    rng = random.Random(1)
    while 1 not in chat.archive.keys():
        reply = chat.send(filler(rng), max_new_tokens=4, temperature=0.0)
        assert reply.kv_bytes <= budget and chat.turn < 120
    reply = chat.send("what was my locker code", max_new_tokens=4, temperature=0.0)
    assert 1 in reply.recall["turns"] and reply.recall["tokens"] > 0, reply.recall
    assert reply.kv_bytes <= budget and reply.context_tokens <= 960
    assert chat.cache.segment_tokens(RECALL_SEGMENT) == 0, "recalled text must leave after its turn"
    assert not any(RECALL_PREFIX.strip() in m["content"] for m in chat.transcript.history + chat.messages)
    after = chat.send(filler(rng), max_new_tokens=4, temperature=0.0)
    assert after.reprefilled_tokens == 0  # the transcript kept no trace of the recalled text
    # what the cache holds is what the transcript says was fed: a fresh chat fed the same ids gives the same logits
    assert len(chat.transcript.fed_ids) >= chat.context_tokens


def test_recall_off_and_a_chat_restored_from_its_state_keeps_the_archive(llm):
    off = llm.chat(system="be brief", tokens=480, policy="turns", recall="off")
    assert off.archive is None
    with pytest.raises(ValueError, match="recall"):
        llm.chat(recall="sometimes")
    chat = llm.chat(system="be brief", tokens=256, policy="window")
    rng = random.Random(2)
    for _ in range(12):
        chat.send(filler(rng), max_new_tokens=4, temperature=0.0)
    assert chat.archive.keys() and chat.memory().archive_bytes == chat.archive.memory_bytes >= chat.archive.nbytes > 0
    restored = Chat.from_state(llm, chat.export_state())
    assert restored.archive.export() == chat.archive.export()
    rebuilt = Chat.from_messages(llm, chat.messages, llm.new_cache(tokens=128, policy="window"))
    assert rebuilt.archive.keys(), "turns a rebuild leaves out go into the archive"


def test_a_raw_prompt_searches_its_tail_one_sentence_at_a_time():
    """The key's passage holds "pass" and "key" but none of the book's words in the sentence before the question:
    one query for the whole tail matches nothing, a query per sentence finds it."""
    from kvbound.chat.passages import search

    tokenizer = type("T", (), {"encode": staticmethod(lambda text: text.split())})
    archive = Archive()
    archive.add(0, "The pass key is 72202. Remember it.")
    for i, words in enumerate(["Elinor walked to the garden", "Marianne sang at the pianoforte",
                               "Sir John proposed a ball", "Mrs Jennings laughed at noon"], start=1):
        archive.add(i, f"{words} and spoke of the weather.")
    tail = "Willoughby rode to Allenham with Margaret before dinner. What is the pass key? The pass key is"
    assert archive.recall(tail, tokenizer, 100) == []
    assert [p.key for p in search(archive, tokenizer, tail, 100)] == [0]
    assert search(archive, tokenizer, tail, 3) == []  # the room holds it or nothing comes back
