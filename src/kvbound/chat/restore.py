"""A chat as plain data and back: export (transcript, ledger totals, the cache's own state), restore from such a
state, or rebuild from saved messages when the KV state is lost (bytes and model checks: chat/snapshot.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from kvbound.chat import snapshot
from kvbound.chat.transcript import Transcript, turn_record
from kvbound.engine.runner import prefill_chunk
from kvbound.errors import SnapshotError
from kvbound.memory.guard import admit_turn

if TYPE_CHECKING:
    from kvbound.chat.session import Chat
    from kvbound.kvcache.paged import PagedCache
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM


def restore_room(capacity: int, reserve: int = 0) -> int:
    """Tokens a conversation restored into a cache of `capacity` keeps (system prompt and newest whole turns) when
    it and `reserve` do not fit: 3/4 of the capacity less the reserve, so the next turns have room to grow."""
    return (capacity * 3) // 4 - reserve


def export_chat(chat: "Chat", cache_state: dict[str, Any]) -> dict[str, Any]:
    """Everything the next turn depends on, as plain data and CPU tensors."""
    log = chat.transcript
    fields = asdict(log)
    fields.update(turn_text=[[t, text] for t, text in sorted(log.turn_text.items())],
                  summarized=sorted(log.summarized), unsummarized=sorted(log.unsummarized),
                  fed_ids=torch.tensor(log.fed_ids, dtype=torch.int32))
    return {"format": snapshot.SESSION_FORMAT, "model": snapshot.model_identity(chat.llm), **fields,
            "ledger": chat.ledger.totals(), "cache": cache_state,
            "archive": chat.archive.snapshot_entries() if chat.archive is not None else None,
            "archive_stored": chat.archive is not None and chat.archive.stored}  # then a store keeps the entries


def transcript_of(state: dict[str, Any]) -> Transcript:
    return Transcript(
        messages=[dict(m) for m in state["messages"]], history=[dict(m) for m in state["history"]],
        turn=int(state["turn"]), turn_text={int(t): text for t, text in state["turn_text"]},
        summary=state["summary"], summarized=set(state["summarized"]), unsummarized=set(state["unsummarized"]),
        pending_note=state["pending_note"], note_segment=state["note_segment"], fed_ids=state["fed_ids"].tolist(),
        fed_text=state["fed_text"], shared_prefix_tokens=int(state["shared_prefix_tokens"]))


def restore_cache(llm: "LLM", state: dict[str, Any], pool: "BlockPool | None", cache: "PagedCache | None"
                  ) -> "PagedCache":
    """The cache of a saved chat, its KV imported: into `cache` (empty, same layout and policy) if given, else a
    cache like the original's over `pool` or over a pool of its own."""
    snapshot.check_model(llm, state)
    saved = state["cache"]
    if cache is None:
        cache = snapshot.cache_for_state(llm, saved, pool)
    elif cache.policy.name != saved["policy"]["name"]:
        raise SnapshotError(f"the saved session evicts with policy '{saved['policy']['name']}' and this cache "
                            f"with '{cache.policy.name}'; restore it into a cache of the same policy")
    cache.import_state(saved)
    return cache


def rebuild(chat: "Chat", messages: list[dict[str, str]], reserve: int) -> None:
    """Feed a saved conversation into the new `chat`'s empty cache (see Chat.from_messages)."""
    llm, cache, log = chat.llm, chat.cache, chat.transcript
    render = llm.tokenizer.apply_chat_template
    head = list(log.messages)
    turns: list[list[dict[str, str]]] = [[]]
    for message in messages[len(head):]:
        turns[-1].append({"role": message["role"], "content": message["content"]})
        if message["role"] == "assistant":
            turns.append([])
    turns = [t for t in turns if t and t[-1]["role"] == "assistant"]  # an unanswered message is not a turn
    log.messages = head + [m for t in turns for m in t]
    log.history, log.turn = list(log.messages), len(turns)
    for k, turn in enumerate(turns, start=1):
        user = next((m["content"] for m in turn if m["role"] == "user"), "")
        log.turn_text[k] = turn_record(user, turn[-1]['content'])
    done, pieces = render(head, add_generation_prompt=False) if head else "", []
    for k in range(len(turns)):  # each turn's text as the template appends it
        text = render(head + [m for t in turns[: k + 1] for m in t], add_generation_prompt=False)
        if not text.startswith(done):
            return  # a template that rewrites earlier turns: the next turn prefills the conversation
        pieces.append(llm.tokenizer.encode(text[len(done):]))
        done = text
    system_ids = llm.tokenizer.encode(render(head, add_generation_prompt=False)) if head else []
    first, room = 0, restore_room(cache.capacity, reserve) - len(system_ids)
    if len(system_ids) + sum(map(len, pieces)) + reserve > cache.capacity:
        first = len(pieces)
        while first and len(pieces[first - 1]) <= room:
            first -= 1
            room -= len(pieces[first])
    chunk = prefill_chunk(llm.runner.chunk, cache.capacity, cache.policy.evicts)
    if llm.guard is not None:
        chunk, _ = admit_turn(llm.guard, llm, cache, len(system_ids) + sum(map(len, pieces[first:])), chunk)
    try:
        if system_ids:
            log.shared_prefix_tokens = chat.prefill_system(system_ids, chunk)
        for k in range(first, len(pieces)):
            cache.set_segment(k + 1, pinned={0, k + 1})
            llm.runner.prefill(pieces[k], cache, chunk)
    except BaseException:
        cache.free()  # a shared pool gets its blocks back
        raise
    cache.forget(sum(map(len, pieces[:first])))  # left out: the next turn must not re-feed them
    chat.archive_turns(list(range(1, first + 1)))  # recall can still bring them back
    log.fed_ids = system_ids + [i for piece in pieces[first:] for i in piece]
    log.fed_text = done
    cache.receipt()  # the rebuild is no turn's work
