"""Recall for a raw prompt: a long text prefilled into an evicting cache loses the exact words it evicts, and the
question at its end may need them. The prompt is prefilled in segments of whole sentences (~100 tokens); the
passages (a sentence or a few) of every segment the cache evicts any of go into an archive (chat/archive.py); the
prompt's last sentences (the tail: where a question sits) search it, and the best passages are prefilled, pinned,
in the prompt's order, just before the tail:

    body (segments 1..S, evictable) · recalled passages (pinned, ≤ 1/4 of the capacity) · tail (last sentences)

Room for the recalled text and the tail is made before the archive is read, so what they push out is archived too.
The archive lives for the one completion. Without eviction nothing is lost and the prompt is prefilled as is."""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import torch

from kvbound.chat.archive import Archive, Passage, fit

if TYPE_CHECKING:
    from kvbound.engine.runner import Runner
    from kvbound.kvcache.paged import PagedCache
    from kvbound.tokenizer.tokenizer import Tokenizer

SEGMENT_MIN, SEGMENT_MAX = 96, 128  # a segment ends at the first sentence end past MIN tokens (or at MAX)
PASSAGE_MIN, PASSAGE_MAX = 8, 32  # an archived passage: the fewest whole sentences that make MIN tokens
TAIL_TOKENS = 64  # the tail: as many whole last sentences as fit in this many tokens (and a quarter of the cache)
RECALL_SEGMENT = -3  # the recalled passages (as in a chat: pinned while in use)
TAIL_SEGMENT = -4
RECALL_SHARE = 8  # recalled chat turns take at most 1/RECALL_SHARE of the capacity
RAW_RECALL_SHARE = 4  # recalled passages of a raw prompt: the question's evidence, nothing else competes
SENTENCE_END = ".?!\n"
JOIN = "\n\n"  # around and between recalled passages


def sentence_ends(tokenizer: "Tokenizer", text: str, ids: list[int]) -> list[int]:
    """Token indices i such that a sentence ends with token i (its text ends in . ? ! or a newline, followed by
    whitespace or the end): cuts after them keep sentences whole. `ids` is `text` encoded (a leading bos allowed)."""
    ends = tokenizer.char_ends(text)
    shift = len(ids) - len(ends)  # the bos token, when the model prepends one
    out = []
    for i, end in enumerate(ends):
        if end > 0 and text[end - 1] in SENTENCE_END and (end == len(text) or text[end].isspace()):
            out.append(i + shift)
    return out


def pieces(start: int, stop: int, cuts: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """Cut tokens [start, stop) into runs of whole sentences: each ends at the first sentence end (a count in
    `cuts`, ascending) at least `lo` tokens in, or after `hi` tokens when none comes by then."""
    spans, k = [], 0
    while start < stop:
        while k < len(cuts) and cuts[k] < start + lo:
            k += 1
        end = min(cuts[k] if k < len(cuts) else stop, start + hi, stop)
        spans.append((start, end))
        start = end
    return spans


def split(n: int, ends: list[int], tail_tokens: int = TAIL_TOKENS
          ) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]], int]:
    """Cut `n` tokens into segments (what is prefilled and evicted as one label), passages (what is archived and
    recalled: a few sentences, small enough to come back under a small budget) and the tail's start. The tail holds
    the last whole sentences that fit in `tail_tokens` tokens (or the last `tail_tokens` tokens when none ends there).
    Segments and passages both end at sentence ends where they can; `passages[i]` cuts `segments[i]`."""
    cuts = [e + 1 for e in ends if e + 1 < n]  # token counts after which a sentence ends
    tail = next((c for c in cuts if n - c <= tail_tokens), max(n - tail_tokens, 0))
    segments = pieces(0, tail, cuts, SEGMENT_MIN, SEGMENT_MAX)
    passages = [pieces(start, stop, cuts, PASSAGE_MIN, PASSAGE_MAX) for start, stop in segments]
    return segments, passages, tail


def search(archive: Archive, tokenizer: "Tokenizer", tail: str, room: int) -> list[Passage]:
    """The passages for the tail's sentences, each sentence its own query, the last first (the question is at the
    end): one query for the whole tail would hold the words of the text before the question too, which no single
    passage covers. Together they fit `room` tokens."""
    if not len(archive):
        return []
    found: dict[int, Passage] = {}
    for sentence in reversed(re.split(r"(?<=[.?!\n])\s+", tail.strip())):
        for passage in archive.search(sentence):
            found.setdefault(passage.key, passage)
    return fit(list(found.values()), tokenizer, room)


def prefill(runner: "Runner", tokenizer: "Tokenizer", cache: "PagedCache", text: str, ids: list[int],
            chunk: int, reserve: int = 0) -> Generator[None, None, tuple[torch.Tensor, dict[str, Any]]]:
    """Prefill `ids` (the tokens of `text`) with recall, one chunk per step (runner.prefill_steps); returns the
    logits after the last token and the recall receipt {"turns": [], "passages": n, "tokens": n, "spans": [[start,
    stop], ...]} (the token spans of the prompt that came back). `reserve`: tokens the caller will still add (the
    reply), for the tail's pin."""
    none = {"turns": [], "passages": 0, "tokens": 0, "spans": []}
    if len(ids) <= cache.capacity or not cache.policy.evicts:  # nothing will be evicted
        return (yield from runner.prefill_steps(ids, cache, chunk)), none
    tail_tokens = min(TAIL_TOKENS, cache.capacity // 4)
    segments, passages, tail = split(len(ids), sentence_ends(tokenizer, text, ids), tail_tokens)
    for number, (start, stop) in enumerate(segments, start=1):
        cache.set_segment(number, pinned=set())
        yield from runner.prefill_steps(ids[start:stop], cache, chunk)
    tail_ids, room = ids[tail:], cache.capacity // RAW_RECALL_SHARE
    cache.make_room(min(room + len(tail_ids), cache.capacity))  # evict now what recall and tail need: archived
    archive, spans = Archive(cap_bytes=max(len(text.encode("utf-8")), 1)), []
    for number, ((start, stop), parts) in enumerate(zip(segments, passages), start=1):
        if cache.segment_tokens(number) < stop - start:  # some of its words are gone: archive all of it
            for a, b in parts:
                archive.add(len(spans), tokenizer.decode(ids[a:b]).strip())
                spans.append([a, b])
    found = sorted(search(archive, tokenizer, tokenizer.decode(tail_ids), room - 2),  # 2: the blank line around
                   key=lambda p: p.key)  # in the prompt's order
    recall_ids = tokenizer.encode(JOIN + JOIN.join(p.text for p in found) + JOIN) if found else []
    pins = {RECALL_SEGMENT} if recall_ids else set()
    if len(recall_ids) + len(tail_ids) + reserve <= cache.capacity // 2:
        pins.add(TAIL_SEGMENT)  # the question stays in view while the reply is written
    if recall_ids:
        cache.set_segment(RECALL_SEGMENT, pinned=pins)
        yield from runner.prefill_steps(recall_ids, cache, chunk)
    cache.set_segment(TAIL_SEGMENT, pinned=pins)
    logits = yield from runner.prefill_steps(tail_ids, cache, chunk)
    recalled = sorted(spans[p.key] for p in found)
    return logits, {"turns": [], "passages": len(found), "tokens": len(recall_ids), "spans": recalled}
