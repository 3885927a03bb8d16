"""One request's work on the engine worker (the scheduler's Task): a chat turn — find or make its session, reserve
room in the shared pool, stream the Chat's reply, record the answered turn — or a raw text completion; and the
usage and session figures its response reports. The routes only submit these and read their events."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kvbound.config import CacheConfig
from kvbound.errors import ContextOverflowError
from kvbound.server.protocol import finish_reason, new_id, usage

if TYPE_CHECKING:
    from kvbound.chat.reply import Reply
    from kvbound.engine.logprobs import TokenLogprob
    from kvbound.engine.generate import Turn
    from kvbound.llm import LLM
    from kvbound.server.admission import PoolAdmission
    from kvbound.server.sessions import Conversation, Plan, SessionRegistry

OnReply = Callable[["Reply"], None]


@dataclass(frozen=True)
class TurnInfo:
    """What is known once a turn starts (the response headers): its session and how its KV was found."""

    session_id: str | None = None
    state: str = ""  # reused | restored | new | rebuilt (see SessionRegistry.plan)
    reused_tokens: int = 0  # tokens of the session's cache kept from earlier requests

    def headers(self) -> dict[str, str]:
        if self.session_id is None:
            return {}
        return {"x-kvbound-session": self.session_id, "x-kvbound-session-state": self.state,
                "x-kvbound-reused-tokens": str(self.reused_tokens)}


@dataclass(frozen=True)
class TurnResult:
    text: str
    finish_reason: str  # OpenAI's: stop | length
    usage: dict[str, Any]
    kvbound: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    prefill_s: float = 0.0  # the engine's time for the turn's prefill (to its first token) ...
    decode_s: float = 0.0  # ... and for the rest of its tokens


def timings(reply: "Reply") -> dict[str, float]:
    """A TurnResult's timing fields, from the engine's Reply."""
    return {"prefill_s": reply.ttft_s, "decode_s": max(0.0, reply.elapsed_s - reply.ttft_s)}


class ChatTurn:
    def __init__(self, registry: "SessionRegistry", admission: "PoolAdmission", conversation: "Conversation",
                 session_id: str | None, sampling: dict[str, Any], on_reply: OnReply | None = None,
                 owner: str | None = None):
        self.registry, self.admission = registry, admission
        self.conversation, self.session_id, self.sampling = conversation, session_id, sampling
        self.owner = owner  # the client, should this turn name a new session (its quota)
        self.on_reply = on_reply
        self.plan: Plan | None = None
        self.info = TurnInfo()
        self._held = self._computed = 0
        self._answered = False

    def start(self) -> Generator[None, None, "Turn"]:
        self.plan = plan = self.registry.plan(self.conversation, self.session_id, self.owner)
        session = plan.session
        self.registry.begin(session)
        held, feed, message = self.registry.turn_tokens(session, plan.user)
        # A new conversation without a session id comes back as another new session: it cannot keep a place.
        queue = self.session_id is not None or plan.state != "new"
        self.admission.admit(session, held, feed, self.sampling["max_new_tokens"], queue=queue)
        # history fed again after an offload (leaving room for the message), or for the first time
        self._computed = self.registry.restore(session, reserve=message + 1)
        self._held = session.chat.context_tokens
        self.info = TurnInfo(session.id, plan.state, self._held - self._computed)
        return session.chat.begin(plan.user, **self.sampling)

    def finish(self, reply: "Reply") -> TurnResult:
        session = self.plan.session
        chat = session.chat
        self.registry.answered(session, reply)
        self._answered = True
        if self.on_reply is not None:
            self.on_reply(reply)
        held = self._held - reply.reprefilled_tokens  # what the turn attended without feeding it
        shared = chat.shared_prefix_tokens if not self._held else 0  # this turn's system prompt, found in the pool
        kept = max(0, held - self._computed) + shared  # cached: computed by earlier requests
        return TurnResult(reply.text, finish_reason(reply.finish_reason),
                          usage(held + reply.prompt_tokens, len(reply.token_ids), kept),
                          {"session_id": session.id, "session_state": self.plan.state, "reused_tokens": kept,
                           "prefilled_tokens": self._computed + reply.prompt_tokens - shared,
                           "refed_history_tokens": self._computed, "reprefilled_tokens": reply.reprefilled_tokens,
                           "context_tokens": reply.context_tokens, "kv_bytes": reply.kv_bytes,
                           "finish_reason": reply.finish_reason,
                           "evicted_tokens": reply.receipt.get("evicted_tokens", 0), "forecast": reply.forecast,
                           "recall": reply.recall,
                           "memory_events": reply.mem_events}, reply.logprobs, **timings(reply))

    def release(self) -> None:
        """Give back what `start` took (once: a turn sent back to the queue is released before it retries)."""
        if self.plan is not None:
            plan, self.plan = self.plan, None
            self.admission.release(plan.session)
            self.registry.end(plan, self._answered)


class RawCompletion:
    """A plain-text completion in a cache sized to the request (prompt + max_tokens, at most what a session may
    hold) whose blocks come from the shared pool: admitted like a chat turn (idle sessions are offloaded to make
    room; 429 when turns in progress hold it), released when it ends."""

    def __init__(self, llm: "LLM", prompt: str, sampling: dict[str, Any], admission: "PoolAdmission",
                 max_context_tokens: int, kv_dtype: str, on_reply: OnReply | None = None):
        self.llm, self.prompt, self.sampling, self.admission = llm, prompt, sampling, admission
        self.max_context_tokens, self.kv_dtype, self.on_reply = max_context_tokens, kv_dtype, on_reply
        self.id = new_id("raw")  # its place in the admission's table
        self.info = TurnInfo()
        self.turn: Turn | None = None

    @property
    def kv_blocks(self) -> int:
        return self.turn.decoder.cache.num_blocks if self.turn is not None else 0

    def start(self) -> Generator[None, None, "Turn"]:
        prompt_tokens = len(self.llm.tokenizer.encode(self.prompt, add_special=True))
        if prompt_tokens + 1 > self.max_context_tokens:
            raise ContextOverflowError(
                f"the prompt is {prompt_tokens:,} tokens and a completion may hold {self.max_context_tokens:,} "
                "(what a session may hold); shorten the prompt or raise --kv-budget",
                needed=prompt_tokens + 1, available=self.max_context_tokens)
        max_tokens = self.sampling["max_new_tokens"]
        tokens = min(self.max_context_tokens, prompt_tokens + max_tokens)
        self.admission.admit(self, 0, prompt_tokens, max_tokens, queue=False)  # a retry is another completion
        return self._prefill(self.llm.begin_raw(self.prompt, cache=CacheConfig(tokens=tokens, dtype=self.kv_dtype),
                                                pool=self.admission.pool, **self.sampling))

    def _prefill(self, steps: Generator[None, None, "Turn"]) -> Generator[None, None, "Turn"]:
        # While it prefills, its blocks count as taken from the pool and as still reserved: room is understated
        # for that while, never overstated.
        self.turn = yield from steps
        return self.turn

    def finish(self, reply: "Reply") -> TurnResult:
        if self.on_reply is not None:
            self.on_reply(reply)
        return TurnResult(reply.text, finish_reason(reply.finish_reason),
                          usage(reply.prompt_tokens, len(reply.token_ids)),
                          {"finish_reason": reply.finish_reason, "kv_bytes": reply.kv_bytes}, reply.logprobs,
                          **timings(reply))

    def release(self) -> None:
        self.admission.release(self)
