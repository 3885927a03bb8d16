"""A chat session: its messages and KV cache; each turn prefills only the text the template added since the
last turn (no re-prefill of the history) and decodes the reply into the same cache."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

from kvbound.chat import snapshot
from kvbound.chat.memory import NOTE_PREFIX, summarize_turns
from kvbound.engine.generate import Generation, stream_tokens
from kvbound.engine.runner import prefill_chunk
from kvbound.engine.sampler import SamplingParams
from kvbound.errors import ContextOverflowError, KVBudgetExceeded
from kvbound.errors import SnapshotError
from kvbound.memory.devices import usage_bytes
from kvbound.memory.guard import MemoryGuard, admit_turn, predict_turn_peak
from kvbound.memory.ledger import Ledger, MemoryReport

if TYPE_CHECKING:
    from kvbound.kvcache.paged import PagedCache
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens prefilled this turn (the new ones only)
    context_tokens: int  # tokens held in the KV cache after the turn
    kv_bytes: int  # bytes of KV data held after the turn
    elapsed_s: float
    finish_reason: str
    ttft_s: float = 0.0  # time to first token (the prefill)
    decode_tokens_per_s: float = 0.0
    reprefilled_tokens: int = 0  # history tokens fed again because the template rewrote earlier text
    receipt: dict[str, Any] = field(default_factory=dict)  # what the KV cache did this turn (see Receipt)
    mem_events: list[dict[str, Any]] = field(default_factory=list)  # thresholds crossed this turn
    forecast: str = ""  # "≈N more turns until the KV budget is full ..."

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_params(**kwargs: Any) -> SamplingParams:
    unknown = set(kwargs) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return SamplingParams(**kwargs).validate()



def restore_room(capacity: int, reserve: int = 0) -> int:
    """Tokens a conversation restored into a cache of `capacity` keeps (system prompt and newest whole turns) when
    it and `reserve` do not fit: 3/4 of the capacity less the reserve, so the next turns have room to grow."""
    return (capacity * 3) // 4 - reserve

class Chat:
    """Segments label the cache's tokens: 0 is the system prompt, turn k (user message + reply) is k. The
    system prompt and the current turn are always pinned; `turns` policies pin the newest turns too."""

    def __init__(self, llm: "LLM", cache: "PagedCache", system: str | None = None):
        self.llm, self.cache = llm, cache
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        # What the template renders: replies exactly as generated (special tokens included), so the rendered
        # history stays a prefix of the next turn's rendering and only the new text is tokenized.
        self._history: list[dict[str, str]] = list(self.messages)
        self.turn = 0
        self.turn_text: dict[int, str] = {}  # turn → "User: ...\nAssistant: ..." (for summaries)
        self.summary = ""  # the pinned note about evicted turns (policy `summarize`)
        self._summarized: set[int] = set()
        self._unsummarized: set[int] = set()  # evicted while the last summary was written
        self._pending_note = ""
        self._note_segment: int | None = None
        self._fed_ids: list[int] = []  # every token fed to the cache, in order (the logical sequence)
        self._fed_text = ""  # the rendered text those tokens spell
        self.last_reply: Reply | None = None
        self.ledger = Ledger(kv_budget_bytes=cache.pool.nbytes + cache.spec.residual_bytes)
        # KV thresholds are against what this session may hold: its pool (or its share) and residual window.
        self.kv_guard = MemoryGuard(self.ledger.kv_budget_bytes, llm.thresholds, what="KV")
        llm.track(self)  # counted in llm.memory(); its KV guard reports to llm.on_memory_event callbacks
        self.shared_prefix_tokens = 0  # system-prompt tokens found in the pool, not computed
        self._offloaded: dict[str, Any] | None = None  # the cache's state while swapped out to host memory
        self.restored_from: str | None = None  # "snapshot" | "messages" for a chat rebuilt from saved state

    @property
    def context_tokens(self) -> int:
        return self.cache.num_tokens

    def send(self, text: str, **sampling: Any) -> Reply:
        for _ in self.stream(text, **sampling):
            pass
        return self.last_reply

    def _pins(self, turn: int, room_for: int = 0) -> set[int]:
        """System prompt, summary note and the current turn are always pinned. `turns` policies also pin the
        newest turns, but only while that leaves room for `room_for` new tokens: a soft pin never refuses a turn."""
        hard = {0, turn} | ({self._note_segment} if self._note_segment is not None else set())
        soft = set(range(max(1, turn - self.cache.policy.recent_turns), turn))
        held = sum(self.cache.segment_tokens(s) for s in hard | soft)
        return hard | soft if held + room_for <= self.cache.capacity else hard

    def stream(self, text: str, **sampling: Any) -> Iterator[str]:
        """Yield the reply in text pieces; `last_reply` holds the Reply once the iterator is exhausted."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty; type some text to send")
        params = sampling_params(**sampling)
        self.reload()  # an offloaded session swaps back in on demand
        llm, tokenizer, cache = self.llm, self.llm.tokenizer, self.cache
        started = time.perf_counter()
        user = {"role": "user", "content": text}
        turn = self.turn + 1
        note = [{"role": "system", "content": NOTE_PREFIX + self._pending_note}] if self._pending_note else []
        rendered = tokenizer.apply_chat_template(self._history + note + [user], add_generation_prompt=True)
        system_ids = self._system_ids(rendered) if not self._fed_ids else []
        note_ids: list[int] = []
        if note:  # the note is its own segment, so it stays pinned after this turn
            note_text = tokenizer.apply_chat_template(self._history + note, add_generation_prompt=False)
            if note_text.startswith(self._fed_text) and rendered.startswith(note_text):
                note_ids = tokenizer.encode(note_text[len(self._fed_text):])
                self._fed_text_note = note_text
        new_ids, keep = self._delta(rendered if not note_ids else None, rendered)
        new_ids = new_ids[len(system_ids):]
        reprefilled = len(self._fed_ids) - keep
        if not cache.policy.evicts and cache.num_tokens - reprefilled + len(system_ids) + len(new_ids) + 1 > cache.capacity:
            needed = cache.num_tokens - reprefilled + len(system_ids) + len(new_ids) + 1
            raise ContextOverflowError(
                f"this turn needs {needed} tokens of context and the KV cache holds {cache.capacity} "
                f"({cache.num_tokens} already used by the conversation); start a new chat, send a shorter "
                "message, raise the KV budget or choose an evicting policy", needed=needed, available=cache.capacity)
        chunk = prefill_chunk(llm.runner.chunk, cache.capacity, cache.policy.evicts)
        pinned = len(system_ids) + (cache.segment_tokens(0) if not system_ids else 0)
        if cache.policy.evicts and pinned + len(new_ids) + 1 > cache.capacity:
            raise KVBudgetExceeded(
                f"this message is {len(new_ids)} tokens; with the pinned system prompt ({pinned} tokens) it does not "
                f"fit the KV budget of {cache.capacity} tokens even after evicting everything else; send a shorter "
                "message or raise --kv-budget", needed=pinned + len(new_ids) + 1, available=cache.capacity)
        feed = len(system_ids) + len(note_ids) + len(new_ids)
        if llm.guard is not None:  # refuse before any work if this turn's predicted peak cannot fit
            chunk, _ = admit_turn(llm.guard, llm, cache, feed, chunk)
        # The step's activations (what memory beyond weights and the preallocated KV this turn needs).
        activation = predict_turn_peak(llm, cache, feed, used_bytes=0, chunk=chunk)
        if reprefilled:
            cache.rollback(reprefilled)
            del self._fed_ids[keep:]
        room = feed + params.max_new_tokens  # what this turn adds, at most
        cache.receipt()  # start this turn's receipt
        try:
            if system_ids:
                cache.set_segment(0, pinned={0})
                shared = cache.attach_prefix(system_ids)  # another session's identical system prompt
                if shared < len(system_ids):
                    llm.runner.prefill(system_ids[shared:], cache, chunk)
                cache.publish_prefix(system_ids)
                self.shared_prefix_tokens = shared
            if note_ids:
                old_note, self._note_segment = self._note_segment, -10 - turn
                cache.set_segment(self._note_segment, pinned=self._pins(turn, room) - {old_note})
                llm.runner.prefill(note_ids, cache, chunk)
            cache.set_segment(turn, pinned=self._pins(turn, room))
            logits = llm.runner.prefill(new_ids, cache, chunk)
            result = Generation(prefill_s=time.perf_counter() - started)
            yield from stream_tokens(llm.runner, tokenizer, cache, logits, params,
                                     self._fed_ids + system_ids + new_ids, result)
        except BaseException:
            # Leave the session usable: drop whatever this turn wrote into the cache (its tokens are pinned,
            # so they are the newest ones), and forget a system prompt that did not make it in whole.
            cache.rollback(cache.segment_tokens(turn))
            if note_ids:
                cache.rollback(cache.segment_tokens(self._note_segment))
                self._note_segment = old_note
            if system_ids:
                cache.rollback(cache.segment_tokens(0))
            raise
        self.turn = turn
        self._fed_ids += system_ids + note_ids + new_ids + result.token_ids
        self._fed_text = rendered + tokenizer.decode(result.token_ids)
        said = result.token_ids[:-1] if result.finish_reason == "stop" and result.token_ids and \
            result.token_ids[-1] in tokenizer.stop_ids else result.token_ids
        self._history += note + [user, {"role": "assistant", "content": tokenizer.decode(said)}]
        self.messages += [user, {"role": "assistant", "content": result.text}]
        self.turn_text[turn] = f"User: {text}\nAssistant: {result.text}"
        if note:
            self._pending_note = ""
        receipt = asdict(cache.receipt())
        if cache.policy.summarizes:
            self._summarize_evicted(receipt)
        self.ledger.record_turn(len(system_ids) + len(note_ids) + len(new_ids) + len(result.token_ids), receipt,
                                activation)
        events = self.kv_guard.check(cache.nbytes)
        if llm.guard is not None:
            events += llm.guard.check(usage_bytes(llm.device))
        _, forecast = self.ledger.forecast(cache.capacity - cache.num_tokens, cache.policy.name, cache.policy.evicts)
        elapsed = time.perf_counter() - started
        decoded = max(len(result.token_ids) - 1, 0)
        self.last_reply = Reply(
            text=result.text, token_ids=result.token_ids, prompt_tokens=len(system_ids) + len(new_ids),
            context_tokens=cache.num_tokens, kv_bytes=cache.nbytes, elapsed_s=elapsed,
            finish_reason=result.finish_reason, ttft_s=result.prefill_s,
            decode_tokens_per_s=decoded / result.decode_s if result.decode_s > 0 else 0.0,
            reprefilled_tokens=reprefilled, receipt=receipt, mem_events=[e.to_dict() for e in events],
            forecast=forecast)

    def _system_ids(self, rendered: str) -> list[int]:
        """Tokens of the system prompt alone, when the rendered conversation starts with it (segment 0)."""
        if not self.messages or self.messages[0]["role"] != "system":
            return []
        prefix = self.llm.tokenizer.apply_chat_template(self.messages[:1], add_generation_prompt=False)
        if not rendered.startswith(prefix):
            return []
        ids = self.llm.tokenizer.encode(prefix)
        return ids if self.llm.tokenizer.encode(rendered)[: len(ids)] == ids else []

    def _delta(self, rendered: str | None, full_rendered: str | None = None) -> tuple[list[int], int]:
        """Token ids to feed for `rendered`, and how many already-fed tokens stay valid.

        The fast path tokenizes only the text appended since the last turn. If the template rewrote earlier
        text (some trim or reformat past messages), fall back to the longest common token prefix.
        """
        tokenizer = self.llm.tokenizer
        if rendered is None:  # a note was split off in front: the delta starts after it
            return tokenizer.encode(full_rendered[len(self._fed_text_note):]), len(self._fed_ids)
        if rendered.startswith(self._fed_text):
            if not self._fed_text:
                prefix = self._system_ids(rendered)
                if prefix:  # the system prompt is tokenized on its own so it can be its own segment
                    return prefix + tokenizer.encode(rendered[len(tokenizer.decode(prefix)):]), 0
            return tokenizer.encode(rendered[len(self._fed_text):]), len(self._fed_ids)
        if self.cache.evicted_total:
            # Evicted tokens cannot be re-fed: keep the cache as it is and feed the text past the common prefix.
            common = 0
            for a, b in zip(rendered, self._fed_text):
                if a != b:
                    break
                common += 1
            return tokenizer.encode(rendered[common:]), len(self._fed_ids)
        full = tokenizer.encode(rendered)
        keep = 0
        for a, b in zip(full, self._fed_ids):
            if a != b:
                break
            keep += 1
        return full[keep:], keep

    def _summarize_evicted(self, receipt: dict) -> None:
        """Turns that lost tokens go into the note, which the next turn pins as its own segment. Making room
        for the summarizing prompt may evict more: those join this receipt and the next turn's summary."""
        evicted = {t for t in receipt["evicted_segments"] if t > 0} | self._unsummarized
        turns = sorted(evicted - self._summarized)
        self._unsummarized = set()
        if not turns:
            return
        text, used = summarize_turns(self, turns, self.summary)
        self._summarized.update(turns)
        extra = self.cache.receipt()
        receipt["evicted_tokens"] += extra.evicted_tokens
        receipt["evictions"] += extra.evictions
        for seg, count in extra.evicted_segments.items():
            receipt["evicted_segments"][seg] = receipt["evicted_segments"].get(seg, 0) + count
            if seg > 0 and seg not in self._summarized:
                self._unsummarized.add(seg)
        receipt["kv_bytes_after"] = self.cache.nbytes
        receipt.update(summarized_turns=turns, summarized_tokens=used, summary=text)
        if text:
            self.summary = self._pending_note = text

    def memory(self) -> MemoryReport:
        """This session's memory: KV reserved/used, tokens held/evicted/quantized/summarized, forecast, RSS."""
        return self.ledger.report(self.llm, self.cache)

    def close(self) -> None:
        """Give the cache's blocks back to the pool."""
        self._offloaded = None
        self.cache.free()

    def reset(self) -> None:
        """Forget the conversation but keep the system prompt."""
        self._offloaded = None
        self.cache.rollback(self.cache.num_tokens)
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._history = list(self.messages)
        self._fed_ids, self._fed_text, self.turn = [], "", 0
        self.turn_text, self.summary, self._pending_note, self._note_segment = {}, "", "", None
        self._summarized, self._unsummarized = set(), set()

    # -- state: export, restore, offload (bytes and model checks live in chat/snapshot.py) ----------------------
    def export_state(self) -> dict[str, Any]:
        """Everything the next turn depends on, as plain data and CPU tensors: messages, the rendered history,
        turn and summary bookkeeping, the tokens fed so far, ledger totals and the KV cache's own state
        (PagedCache.export_state). The chat keeps running; `snapshot.to_bytes` turns the state into bytes."""
        ledger = self.ledger
        return {
            "format": snapshot.SESSION_FORMAT, "model": snapshot.model_identity(self.llm),
            "messages": [dict(m) for m in self.messages], "history": [dict(m) for m in self._history],
            "turn": self.turn, "turn_text": [[t, text] for t, text in sorted(self.turn_text.items())],
            "summary": self.summary, "summarized": sorted(self._summarized),
            "unsummarized": sorted(self._unsummarized), "pending_note": self._pending_note,
            "note_segment": self._note_segment, "fed_ids": torch.tensor(self._fed_ids, dtype=torch.int32),
            "fed_text": self._fed_text, "shared_prefix_tokens": self.shared_prefix_tokens,
            "ledger": {"turns": ledger.turns, "tokens_evicted": ledger.tokens_evicted,
                       "tokens_quantized": ledger.tokens_quantized, "tokens_summarized": ledger.tokens_summarized,
                       "activation_peak_bytes": ledger.activation_peak_bytes,
                       "turn_sizes": list(ledger.turn_sizes)},
            "cache": self._offloaded if self._offloaded is not None else self.cache.export_state(),
        }

    @classmethod
    def from_state(cls, llm: "LLM", state: dict[str, Any], pool: "BlockPool | None" = None,
                   cache: "PagedCache | None" = None) -> "Chat":
        """The chat `export_state` described, continuing exactly where it was. It restores into `cache` (an
        empty cache of the same KV layout and policy) if given, else into a cache like the original's over
        `pool` (a shared pool) or over a pool of its own. Raises SnapshotError for a state of another model,
        dtype or KV layout, KVBudgetExceeded (nothing allocated) when the pool lacks free blocks."""
        snapshot.check_model(llm, state)
        saved = state["cache"]
        if cache is None:
            cache = snapshot.cache_for_state(llm, saved, pool)
        elif cache.policy.name != saved["policy"]["name"]:
            raise SnapshotError(f"the saved session evicts with policy '{saved['policy']['name']}' and this cache "
                                f"with '{cache.policy.name}'; restore it into a cache of the same policy")
        cache.import_state(saved)
        chat = cls(llm, cache)
        chat.messages = [dict(m) for m in state["messages"]]
        chat._history = [dict(m) for m in state["history"]]
        chat.turn = int(state["turn"])
        chat.turn_text = {int(t): text for t, text in state["turn_text"]}
        chat.summary, chat._pending_note = state["summary"], state["pending_note"]
        chat._summarized, chat._unsummarized = set(state["summarized"]), set(state["unsummarized"])
        chat._note_segment = state["note_segment"]
        chat._fed_ids, chat._fed_text = state["fed_ids"].tolist(), state["fed_text"]
        chat.shared_prefix_tokens = int(state["shared_prefix_tokens"])
        totals = dict(state["ledger"])
        chat.ledger.restore_turn_sizes(totals.pop("turn_sizes"))
        for name, value in totals.items():
            setattr(chat.ledger, name, int(value))
        chat.restored_from = "snapshot"
        return chat

    @classmethod
    def from_messages(cls, llm: "LLM", messages: list[dict[str, str]], cache: "PagedCache",
                      reserve: int = 0) -> "Chat":
        """A chat holding a saved conversation whose KV state is lost: the system prompt and the newest whole
        turns go through one prefill into `cache`, each turn its own segment (replies are not regenerated).
        Cost: prefill of every token of the conversation if it and `reserve` (tokens the next turn's message will
        add) fit the cache, else of at most 3/4 of the capacity less the reserve (the system prompt and the newest
        turns); older turns stay in `messages` but, as after an eviction, not in the cache. A summarize policy's note is not rebuilt. With a template that rewrites
        earlier turns nothing is fed now: the next turn prefills the conversation."""
        render = llm.tokenizer.apply_chat_template
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        chat = cls(llm, cache, system=system)
        head = list(chat.messages)
        turns: list[list[dict[str, str]]] = [[]]
        for message in messages[len(head):]:
            turns[-1].append({"role": message["role"], "content": message["content"]})
            if message["role"] == "assistant":
                turns.append([])
        turns = [t for t in turns if t and t[-1]["role"] == "assistant"]  # an unanswered message is not a turn
        chat.messages = head + [m for t in turns for m in t]
        chat._history, chat.turn = list(chat.messages), len(turns)
        for k, turn in enumerate(turns, start=1):
            user = next((m["content"] for m in turn if m["role"] == "user"), "")
            chat.turn_text[k] = f"User: {user}\nAssistant: {turn[-1]['content']}"
        chat.restored_from = "messages"
        done, pieces = render(head, add_generation_prompt=False) if head else "", []
        for k in range(len(turns)):  # each turn's text as the template appends it
            text = render(head + [m for t in turns[: k + 1] for m in t], add_generation_prompt=False)
            if not text.startswith(done):
                return chat
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
                cache.set_segment(0, pinned={0})
                chat.shared_prefix_tokens = cache.attach_prefix(system_ids)
                if chat.shared_prefix_tokens < len(system_ids):
                    llm.runner.prefill(system_ids[chat.shared_prefix_tokens:], cache, chunk)
                cache.publish_prefix(system_ids)
            for k in range(first, len(pieces)):
                cache.set_segment(k + 1, pinned={0, k + 1})
                llm.runner.prefill(pieces[k], cache, chunk)
        except BaseException:
            cache.free()  # a shared pool gets its blocks back
            raise
        cache.forget(sum(map(len, pieces[:first])))  # left out: the next turn must not re-feed them
        chat._fed_ids = system_ids + [i for piece in pieces[first:] for i in piece]
        chat._fed_text = done
        cache.receipt()  # the rebuild is no turn's work
        return chat

    @property
    def offloaded(self) -> bool:
        """Whether the KV is swapped out to host memory (the next turn or `reload()` brings it back)."""
        return self._offloaded is not None

    def offload(self) -> int:
        """Swap this session's KV out: copy what its cache holds to host memory (CPU tensors, storage format,
        nothing more) and give its blocks back to the pool for other sessions. Returns the pool bytes freed
        (blocks still shared with another session stay in the pool)."""
        if self._offloaded is not None:
            return 0
        free_before = self.cache.pool.free_blocks
        self._offloaded = self.cache.export_state()
        self.cache.free()
        return (self.cache.pool.free_blocks - free_before) * self.cache.spec.bytes_per_block

    def reload(self) -> None:
        """Swap the KV back into the pool (a no-op unless offloaded). KVBudgetExceeded, with the blocks needed
        and free, if the pool lacks room: the session stays offloaded and the pool unchanged."""
        if self._offloaded is not None:
            self.cache.import_state(self._offloaded)
            self._offloaded = None
