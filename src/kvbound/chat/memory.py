"""Summaries of evicted turns. The note is written by the model inside the session's own cache (a temporary,
pinned segment that is rolled back afterwards), so summarizing never needs memory beyond the KV budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbound.engine.generate import Generation, stream_tokens
from kvbound.engine.sampler import SamplingParams
from kvbound.errors import KVBudgetExceeded

if TYPE_CHECKING:
    from kvbound.chat.session import Chat

SCRATCH_SEGMENT = -2  # the summarizing prompt; rolled back when done
NOTE_PREFIX = "Notes from earlier in this conversation: "
INSTRUCTION = ("Here is an earlier part of a conversation.\n\n{text}\n\nWrite the facts the user stated "
               "(names, numbers, codes, plans) as one short list. Keep every number exactly.")


def summarize_evicted(chat: "Chat", receipt: dict) -> None:
    """Turns that lost tokens go into the note, which the next turn pins as its own segment. Making room for the
    summarizing prompt may evict more: those join `receipt` (this turn's) and the next turn's summary."""
    log = chat.transcript
    evicted = {t for t in receipt["evicted_segments"] if t > 0} | log.unsummarized
    turns = sorted(evicted - log.summarized)
    log.unsummarized = set()
    if not turns:
        return
    text, used = summarize_turns(chat, turns, log.summary)
    log.summarized.update(turns)
    extra = chat.cache.receipt()
    receipt["evicted_tokens"] += extra.evicted_tokens
    receipt["evictions"] += extra.evictions
    for seg, count in extra.evicted_segments.items():
        receipt["evicted_segments"][seg] = receipt["evicted_segments"].get(seg, 0) + count
        if seg > 0 and seg not in log.summarized:
            log.unsummarized.add(seg)
    receipt["kv_bytes_after"] = chat.cache.nbytes
    receipt.update(summarized_turns=turns, summarized_tokens=used, summary=text)
    if text:
        log.summary = log.pending_note = text


def summarize_turns(chat: "Chat", turns: list[int], previous: str, max_new_tokens: int = 64) -> tuple[str, int]:
    """Return (summary text, tokens of evicted text that went into it). Empty text if there is no room."""
    llm, cache, tokenizer = chat.llm, chat.cache, chat.llm.tokenizer
    # The prompt may take up to a third of the budget; eviction (already under way) frees that room first.
    room = cache.capacity // 3 - max_new_tokens - 1
    parts = ([f"(earlier notes) {previous}"] if previous else []) + [chat.transcript.turn_text[t] for t in turns]
    while parts:
        messages = [{"role": "user", "content": INSTRUCTION.format(text="\n".join(parts))}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if len(ids) <= room:
            break
        parts.pop(0)  # drop the oldest part until the prompt fits beside the chat
        ids = []
    if not ids:
        return "", 0
    try:
        cache.make_room(len(ids) + max_new_tokens + 1)
    except KVBudgetExceeded:
        return "", 0
    # No control tokens in a note, and no stopping before a few words are written.
    bans = {i: float("-inf") for i in tokenizer.special_ids}
    segment, pins = cache.labels()
    cache.set_segment(SCRATCH_SEGMENT, pinned=pins | {SCRATCH_SEGMENT})
    try:
        logits = llm.runner.prefill(ids, cache)
        result = Generation()
        for _ in stream_tokens(llm.runner, tokenizer, cache, logits,
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, logit_bias=bans), ids, result):
            pass
    finally:
        cache.rollback(cache.segment_tokens(SCRATCH_SEGMENT))
        cache.set_segment(segment, pinned=pins)
    return result.text.strip(), len(ids)
