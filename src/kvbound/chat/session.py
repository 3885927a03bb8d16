"""A chat session: its messages and KV cache; each turn prefills only the text the template added since the
last turn (no re-prefill of the history) and decodes the reply into the same cache."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from kvbound.engine.generate import Generation, stream_tokens
from kvbound.engine.sampler import SamplingParams
from kvbound.errors import ContextOverflowError

if TYPE_CHECKING:
    from kvbound.kvcache.base import KVCache
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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_params(**kwargs: Any) -> SamplingParams:
    unknown = set(kwargs) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return SamplingParams(**kwargs).validate()


class Chat:
    def __init__(self, llm: "LLM", cache: "KVCache", system: str | None = None):
        self.llm, self.cache = llm, cache
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._fed_ids: list[int] = []  # every token fed to the cache, in order (the logical sequence)
        self._fed_text = ""  # the rendered text those tokens spell
        self.last_reply: Reply | None = None

    @property
    def context_tokens(self) -> int:
        return self.cache.num_tokens

    def send(self, text: str, **sampling: Any) -> Reply:
        for _ in self.stream(text, **sampling):
            pass
        return self.last_reply

    def stream(self, text: str, **sampling: Any) -> Iterator[str]:
        """Yield the reply in text pieces; `last_reply` holds the Reply once the iterator is exhausted."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty; type some text to send")
        params = sampling_params(**sampling)
        llm, tokenizer = self.llm, self.llm.tokenizer
        started = time.perf_counter()
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        new_ids, keep = self._delta(rendered)
        reprefilled = len(self._fed_ids) - keep
        needed = keep + len(new_ids)
        capacity = getattr(self.cache, "capacity", None)
        if capacity is not None and needed + 1 > capacity:
            raise ContextOverflowError(
                f"this turn needs {needed} tokens of context and the cache holds {capacity} "
                f"({self.cache.num_tokens} already used by the conversation); start a new chat, send a shorter "
                "message, or use a KV budget with an eviction policy", needed=needed + 1, available=capacity)
        if reprefilled:
            self.cache.rollback(reprefilled)
            del self._fed_ids[keep:]
        turn_start = len(self._fed_ids)
        try:
            logits = llm.runner.prefill(new_ids, turn_start, self.cache)
            prefill_s = time.perf_counter() - started
            result = Generation(prefill_s=prefill_s)
            yield from stream_tokens(llm.runner, tokenizer, self.cache, logits, turn_start + len(new_ids), params,
                                     self._fed_ids + new_ids, result)
        except BaseException:
            # Leave the session as it was before this turn: drop whatever this turn wrote into the cache.
            self.cache.rollback(self.cache.num_tokens - turn_start)
            raise
        self._fed_ids += new_ids + result.token_ids
        self._fed_text = rendered + tokenizer.decode(result.token_ids)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        elapsed = time.perf_counter() - started
        decoded = max(len(result.token_ids) - 1, 0)
        self.last_reply = Reply(
            text=result.text, token_ids=result.token_ids, prompt_tokens=len(new_ids),
            context_tokens=self.cache.num_tokens, kv_bytes=llm.kv_spec.bytes_for(self.cache.num_tokens),
            elapsed_s=elapsed, finish_reason=result.finish_reason, ttft_s=result.prefill_s,
            decode_tokens_per_s=decoded / result.decode_s if result.decode_s > 0 else 0.0,
            reprefilled_tokens=reprefilled)

    def _delta(self, rendered: str) -> tuple[list[int], int]:
        """Token ids to feed for `rendered`, and how many already-fed tokens stay valid.

        The fast path tokenizes only the text appended since the last turn. If the template rewrote earlier
        text (some trim or reformat past messages), fall back to the longest common token prefix.
        """
        tokenizer = self.llm.tokenizer
        if rendered.startswith(self._fed_text):
            return tokenizer.encode(rendered[len(self._fed_text):]), len(self._fed_ids)
        full = tokenizer.encode(rendered)
        keep = 0
        for a, b in zip(full, self._fed_ids):
            if a != b:
                break
            keep += 1
        return full[keep:], keep

    def reset(self) -> None:
        """Forget the conversation but keep the system prompt."""
        self.cache.rollback(self.cache.num_tokens)
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._fed_ids, self._fed_text = [], ""
