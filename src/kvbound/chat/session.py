"""A chat session: messages turned into cache segments. Each turn prefills only the text the template added
since the last turn (no re-prefill of the history) and decodes the reply into the same cache.

Segments label the cache's tokens: 0 is the system prompt, turn k (user message + reply) is k, a summary note
its own negative segment. The system prompt, the note and the current turn are always pinned; policies with
`recent_turns` pin the newest turns too, while that leaves room for the current one.

With recall on, the exact text of every turn the cache evicts goes into the session's archive (chat/archive.py: in
process, or in the session's SessionStore file when it has one, chat/stored_archive.py); before a turn, the
archive's best matches for the new message come back as a pinned note just before it (at most an eighth of the
capacity, taking room by eviction like any tokens), and leave the cache again after the turn."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator

from kvbound.chat import restore
from kvbound.chat.archive import Archive, Passage
from kvbound.chat.memory import NOTE_PREFIX, summarize_evicted
from kvbound.chat.passages import RECALL_SEGMENT, RECALL_SHARE
from kvbound.chat.transcript import Transcript, blocks, delta, system_ids, turn_record, user_words
from kvbound.engine.generate import Decoder, Generation, Turn
from kvbound.engine.runner import complete
from kvbound.chat.reply import Reply
from kvbound.engine.sampler import sampling_params
from kvbound.memory.devices import usage_bytes
from kvbound.memory.guard import MemoryGuard, admit_chat_turn, predict_turn_peak
from kvbound.memory.ledger import Ledger, MemoryReport

if TYPE_CHECKING:
    from kvbound.kvcache.paged import PagedCache
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM


# A recalled turn comes back in the user's own words. The assistant's side is searched but not shown: a small model
# copies its own earlier replies, wrong or degenerate ones included, when they come back, while a fact the user
# asks for again is in what the user said (benchmarks/recall.py: 6 / 8 answers against 3 / 8 with both sides).
RECALL_PREFIX = "Earlier in this conversation the user said:\n"


@dataclass
class _Plan:
    """One turn between its prefill and its end."""

    turn: int
    user: list[dict[str, str]]  # the user's message, or none (a reply to the system prompt alone)
    note: list[dict[str, str]]
    rendered: str
    fed: list[int]  # system prompt, note and message tokens fed this turn
    prompt_tokens: int
    reprefilled: int
    activation: int
    started: float
    result: Generation
    recall: dict[str, Any]  # {"turns": [...], "passages": n, "tokens": n}
    unrecalled: str  # the rendering without the recalled note (what the transcript keeps)


def recall_message(recalled: list[Passage]) -> list[dict[str, str]]:
    """The recalled turns as one system message (none without any), oldest first, in the user's own words."""
    if not recalled:
        return []
    text = "\n\n".join(user_words(p.text) for p in sorted(recalled, key=lambda p: p.key))
    return [{"role": "system", "content": RECALL_PREFIX + text}]


class Chat:
    def __init__(self, llm: "LLM", cache: "PagedCache", system: str | None = None, recall: bool = False,
                 archive: Archive | None = None):
        """`archive`: where the text of evicted turns goes with recall on (a store's archive of the session);
        None: an archive in process of its own."""
        self.llm, self.cache = llm, cache
        self.transcript = Transcript.with_system(system)
        # the text of evicted turns, for recall
        self.archive = (archive if archive is not None else Archive()) if recall else None
        self.last_reply: Reply | None = None
        self.ledger = Ledger(kv_budget_bytes=cache.reserved_bytes)
        # KV thresholds are against what this session may hold: its pool (or its share) and residual window.
        self.kv_guard = MemoryGuard(self.ledger.kv_budget_bytes, llm.thresholds, what="KV")
        llm.track(self)  # counted in llm.memory(); its KV guard reports to llm.on_memory_event callbacks
        self._offloaded: dict[str, Any] | None = None  # the cache's state while swapped out to host memory
        self.restored_from: str | None = None  # "snapshot" | "messages" for a chat rebuilt from saved state

    # -- what it holds ----------------------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        return self.transcript.messages

    @property
    def turn(self) -> int:
        return self.transcript.turn

    @property
    def summary(self) -> str:
        return self.transcript.summary

    @property
    def shared_prefix_tokens(self) -> int:
        return self.transcript.shared_prefix_tokens

    @property
    def context_tokens(self) -> int:
        return self.cache.num_tokens

    # -- a turn -------------------------------------------------------------------------------------------------------
    def send(self, text: str | None, **sampling: Any) -> Reply:
        """The reply to `text` (None: to the system prompt alone, in a chat that holds nothing else). Sampling
        options are SamplingParams' fields: temperature, max_new_tokens, stop, json_schema={...} (only JSON that
        schema accepts; {"type": "object"} for any object), grammar="..." (a Lark grammar), logprobs=N (each token's
        logprob and N alternatives' on the Reply), ..."""
        for _ in self.stream(text, **sampling):
            pass
        return self.last_reply

    def stream(self, text: str | None, **sampling: Any) -> Iterator[str]:
        """Yield the reply in text pieces; `last_reply` holds the Reply once the iterator is exhausted."""
        yield from self.start(text, **sampling).run()

    def start(self, text: str | None, **sampling: Any) -> Turn:
        """Prefill the new message and return the turn ready to decode (alone with `run()`, or batched with other
        sequences: engine/batch.py). Its `commit()` records the turn and returns the Reply; `abort()` rolls back.
        `text` None answers the system prompt alone (as OpenAI does a request of only a system message)."""
        return complete(self.begin(text, **sampling))

    def begin(self, text: str | None, **sampling: Any) -> Generator[None, None, Turn]:
        """`start` one prefill chunk per step: a scheduler interleaves a long message's prefill with other
        sequences' decode steps. Closing it midway rolls the turn back."""
        if text is None:
            if [m["role"] for m in self.messages] != ["system"]:
                raise ValueError("there is no message to answer; send the user's text (a reply without one is only "
                                 "for a chat that holds nothing but its system prompt)")
        elif not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty; type some text to send")
        params = sampling_params(self.llm.config.vocab_size, **sampling)
        self.reload()  # an offloaded session swaps back in on demand
        llm, tokenizer, cache, log = self.llm, self.llm.tokenizer, self.cache, self.transcript
        started = time.perf_counter()
        user, turn = [] if text is None else [{"role": "user", "content": text}], log.turn + 1
        note = [{"role": "system", "content": NOTE_PREFIX + log.pending_note}] if log.pending_note else []
        recalled = []
        if self.archive is not None and text is not None:
            share = cache.capacity // RECALL_SHARE - len(tokenizer.encode(RECALL_PREFIX)) - 8  # 8: the role markup
            recalled = self.archive.recall(text, tokenizer, share, shown=user_words)
        recall = recall_message(recalled)
        unrecalled = tokenizer.apply_chat_template(log.history + note + user, add_generation_prompt=True)
        rendered = tokenizer.apply_chat_template(log.history + note + recall + user, add_generation_prompt=True) \
            if recall else unrecalled
        system = system_ids(tokenizer, log.messages, rendered) if not log.fed_ids else []
        # The note and the recalled text are their own segments (pinned; the note stays, the recall leaves after
        # the turn), when the template renders each as a block appended after the history.
        split = blocks(tokenizer, log, [e for e in (note, recall) if e], rendered) if note or recall else None
        if recall and split is None:  # the template does not take it as a block: no recall this turn
            recalled, recall, rendered = [], [], unrecalled
            split = blocks(tokenizer, log, [note], rendered) if note else None
        note_ids = split[0][0] if split is not None and note else []
        recall_ids = split[0][-1] if split is not None and recall else []
        if split is not None:
            new_ids, keep = tokenizer.encode(rendered[len(split[1]):]), len(log.fed_ids)
        else:
            new_ids, keep = delta(tokenizer, log, rendered, evicted=cache.evicted_total > 0)
            new_ids = new_ids[len(system):]
        reprefilled = len(log.fed_ids) - keep
        feed = len(system) + len(note_ids) + len(recall_ids) + len(new_ids)
        chunk = admit_chat_turn(llm, cache, cache.num_tokens - reprefilled, len(system), len(new_ids), feed)
        activation = predict_turn_peak(llm, cache, feed, used_bytes=0, chunk=chunk)  # the step's activations
        if reprefilled:
            cache.rollback(reprefilled)
            del log.fed_ids[keep:]
        room = feed + params.max_new_tokens  # what this turn adds, at most
        cache.receipt()  # start this turn's receipt
        old_note = log.note_segment

        def abort() -> None:  # leave the session usable: drop what this turn wrote (its tokens are the newest)
            cache.rollback(cache.segment_tokens(turn))
            cache.rollback(cache.segment_tokens(RECALL_SEGMENT))
            if note_ids:
                cache.rollback(cache.segment_tokens(log.note_segment))
                log.note_segment = old_note
            if system:
                cache.rollback(cache.segment_tokens(0))  # a system prompt that did not make it in whole

        try:
            if system:
                log.shared_prefix_tokens = yield from self.prefill_system_steps(system, chunk)
            if note_ids:
                log.note_segment = -10 - turn
                cache.set_segment(log.note_segment, pinned=self._pins(turn, room) - {old_note})
                yield from llm.runner.prefill_steps(note_ids, cache, chunk)
            if recall_ids:
                cache.set_segment(RECALL_SEGMENT, pinned=self._pins(turn, room) | {RECALL_SEGMENT})
                yield from llm.runner.prefill_steps(recall_ids, cache, chunk)
            cache.set_segment(turn, pinned=self._pins(turn, room) | ({RECALL_SEGMENT} if recall_ids else set()))
            logits = yield from llm.runner.prefill_steps(new_ids, cache, chunk)
            result = Generation(prefill_s=time.perf_counter() - started)
            decoder = Decoder(llm.runner, tokenizer, cache, logits, params, log.fed_ids + system + new_ids, result)
        except BaseException:
            abort()
            raise
        receipt = {"turns": sorted(p.key for p in recalled), "passages": len(recalled), "tokens": len(recall_ids)}
        plan = _Plan(turn, user, note, rendered, system + note_ids + new_ids, len(system) + len(new_ids),
                     reprefilled, activation, started, result, receipt, unrecalled)
        return Turn(decoder, lambda: self._commit(plan), abort)

    def archive_turns(self, turns: list[int]) -> None:
        """Keep the exact text of `turns` (evicted, or left out of a rebuilt cache) for recall."""
        if self.archive is not None:
            for turn in turns:
                if turn > 0 and turn in self.transcript.turn_text:
                    self.archive.add(turn, self.transcript.turn_text[turn])

    def keep_archive_in(self, archive: Archive) -> None:
        """Keep the archive in `archive` from now on (a SessionStore's for this session): its entries become this
        chat's."""
        entries = self.archive.export() if self.archive is not None else []
        archive.clear()
        archive.restore(entries)
        self.archive = archive

    def prefill_system(self, ids: list[int], chunk: int) -> int:
        """Feed the system prompt as pinned segment 0, sharing blocks another session already holds; returns the
        tokens found in the pool."""
        return complete(self.prefill_system_steps(ids, chunk))

    def prefill_system_steps(self, ids: list[int], chunk: int) -> Generator[None, None, int]:
        cache = self.cache
        cache.set_segment(0, pinned={0})
        shared = cache.attach_prefix(ids)
        if shared < len(ids):
            yield from self.llm.runner.prefill_steps(ids[shared:], cache, chunk)
        cache.publish_prefix(ids)
        return shared

    def _pins(self, turn: int, room_for: int = 0) -> set[int]:
        """The system prompt, the note and the current turn; and the newest `recent_turns` turns while that leaves
        room for `room_for` new tokens: a soft pin never refuses a turn."""
        note = self.transcript.note_segment
        hard = {0, turn} | ({note} if note is not None else set())
        soft = set(range(max(1, turn - self.cache.policy.recent_turns), turn))
        held = sum(self.cache.segment_tokens(s) for s in hard | soft)
        return hard | soft if held + room_for <= self.cache.capacity else hard

    def _commit(self, plan: _Plan) -> Reply:
        llm, tokenizer, cache, log, result = self.llm, self.llm.tokenizer, self.cache, self.transcript, plan.result
        cache.drop_segment(RECALL_SEGMENT)  # recalled text stays for its turn only
        log.turn = plan.turn
        log.fed_ids += plan.fed + result.token_ids
        log.fed_text = plan.unrecalled + tokenizer.decode(result.token_ids)
        stopped = result.finish_reason == "stop" and result.token_ids and result.token_ids[-1] in tokenizer.stop_ids
        said = result.token_ids[:-1] if stopped else result.token_ids
        log.history += plan.note + plan.user + [{"role": "assistant", "content": tokenizer.decode(said)}]
        log.messages += plan.user + [{"role": "assistant", "content": result.text}]
        asked = plan.user[0]["content"] if plan.user else ""
        log.turn_text[plan.turn] = turn_record(asked, result.text)
        if plan.note:
            log.pending_note = ""
        receipt = asdict(cache.receipt())
        if cache.policy.summarizes:
            summarize_evicted(self, receipt)
        self.archive_turns([t for t in receipt["evicted_segments"] if t > 0])
        self.ledger.record_turn(len(plan.fed) + len(result.token_ids), receipt, plan.activation)
        events = self.kv_guard.check(cache.nbytes)
        if llm.guard is not None:
            events += llm.guard.check(usage_bytes(llm.device))
        _, forecast = self.ledger.forecast(cache.capacity - cache.num_tokens, cache.policy.name, cache.policy.evicts)
        decoded = max(len(result.token_ids) - 1, 0)
        self.last_reply = Reply(
            text=result.text, token_ids=result.token_ids, prompt_tokens=plan.prompt_tokens,
            context_tokens=cache.num_tokens, kv_bytes=cache.nbytes, elapsed_s=time.perf_counter() - plan.started,
            finish_reason=result.finish_reason, ttft_s=result.prefill_s,
            decode_tokens_per_s=decoded / result.decode_s if result.decode_s > 0 else 0.0,
            reprefilled_tokens=plan.reprefilled, receipt=receipt, mem_events=[e.to_dict() for e in events],
            forecast=forecast, recall=plan.recall, logprobs=result.logprobs)
        return self.last_reply

    # -- the session --------------------------------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        """This session's memory: KV reserved/used, tokens held/evicted/quantized/summarized, forecast, RSS, and
        the archive's bytes in process and (kept in a store) on disk."""
        archive = self.archive
        if archive is None:
            return self.ledger.report(self.llm, self.cache)
        return self.ledger.report(self.llm, self.cache, archive.memory_bytes, archive.stored_bytes)

    def close(self) -> None:
        """Give the cache's blocks back to the pool."""
        self._offloaded = None
        self.cache.free()

    def reset(self) -> None:
        """Forget the conversation but keep the system prompt."""
        self._offloaded = None
        self.cache.rollback(self.cache.num_tokens)
        system = next((m["content"] for m in self.messages if m["role"] == "system"), None)
        self.transcript = Transcript.with_system(system)
        if self.archive is not None:
            self.archive.clear()

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

    # -- saved state (chat/restore.py) ------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Everything the next turn depends on, as plain data and CPU tensors: the transcript, ledger totals and
        the KV cache's own state. The chat keeps running; `snapshot.to_bytes` turns the state into bytes."""
        state = self._offloaded if self._offloaded is not None else self.cache.export_state()
        return restore.export_chat(self, state)

    @classmethod
    def from_state(cls, llm: "LLM", state: dict[str, Any], pool: "BlockPool | None" = None,
                   cache: "PagedCache | None" = None, archive: Archive | None = None) -> "Chat":
        """The chat `export_state` described, continuing exactly where it was. It restores into `cache` (an
        empty cache of the same KV layout and policy) if given, else into a cache like the original's over
        `pool` (a shared pool) or over a pool of its own. Raises SnapshotError for a state of another model,
        dtype or KV layout, KVBudgetExceeded (nothing allocated) when the pool lacks free blocks. A state whose
        archive was kept in a store carries none: the chat recalls from `archive` (that store's archive of the
        session), else from an empty one; a state that carries its archive restores it in process."""
        stored = archive if state.get("archive_stored") else None
        chat = cls(llm, restore.restore_cache(llm, state, pool, cache), recall=state.get("archive") is not None,
                   archive=stored)
        chat.transcript = restore.transcript_of(state)
        if chat.archive is not None and stored is None:
            chat.archive.restore(state["archive"])
        chat.ledger.restore(state["ledger"])
        chat.restored_from = "snapshot"
        return chat

    @classmethod
    def from_messages(cls, llm: "LLM", messages: list[dict[str, str]], cache: "PagedCache",
                      reserve: int = 0, recall: bool | None = None, archive: Archive | None = None) -> "Chat":
        """A chat holding a saved conversation whose KV state is lost: the system prompt and the newest whole
        turns go through one prefill into `cache`, each turn its own segment (replies are not regenerated).
        Cost: prefill of every token of the conversation if it and `reserve` (tokens the next turn's message will
        add) fit the cache, else of at most 3/4 of the capacity less the reserve (the system prompt and the newest
        turns); older turns stay in `messages` but, as after an eviction, not in the cache. A summarize policy's
        note is not rebuilt. With a template that rewrites earlier turns nothing is fed now: the next turn
        prefills the conversation. With recall on, turns left out go into `archive` (None: one in process)."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        chat = cls(llm, cache, system=system, recall=cache.policy.evicts if recall is None else recall,
                   archive=archive)
        chat.restored_from = "messages"
        restore.rebuild(chat, messages, reserve)
        return chat
