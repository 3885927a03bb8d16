"""The memory budget: threshold events (once per upward crossing, re-armed below), and admission of a turn whose
predicted peak must stay within the budget — after the relief ladder (quantize → evict → summarize) if one is
given, else refused with MemoryBudgetExceeded. Predicts from shapes (memory.estimate); owns no tensors."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvbound.engine.runner import prefill_chunk
from kvbound.errors import ContextOverflowError, KVBudgetExceeded, MemoryBudgetExceeded
from kvbound.kvcache.spec import format_bytes, parse_size
from kvbound.memory import devices
from kvbound.memory.estimate import activation_peak, scratch_bytes

logger = logging.getLogger("kvbound.memory")
DEFAULT_THRESHOLDS = (0.8, 0.95)
SUGGESTION = "use --kv-dtype int8 (or int4), a smaller --kv-budget, or send a shorter message"


class MemoryWarning(UserWarning):
    """Memory use crossed a threshold of the budget (a UserWarning, so Python shows it by default)."""


@dataclass(frozen=True)
class MemoryEvent:
    kind: str  # "warning" | "critical" (the highest threshold) | "refused" (a turn did not fit)
    used_bytes: int
    budget_bytes: int
    fraction: float  # used / budget
    message: str
    threshold: float | None = None  # the crossed threshold (None for "refused")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# A rung of the relief ladder: given the bytes still missing, free what it can and return the bytes it freed.
Relief = Callable[[int], int]


class MemoryGuard:
    def __init__(self, budget_bytes: int | str, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 what: str = "memory"):
        self.budget_bytes = parse_size(budget_bytes)
        self.thresholds = tuple(sorted(thresholds))
        if not self.thresholds or not all(0.0 < t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be fractions of the budget in (0, 1], got {tuple(thresholds)}")
        self.what = what  # "memory" (the process) or "KV" — named in messages
        self._armed = [True] * len(self.thresholds)
        self._callbacks: list[Callable[[MemoryEvent], None]] = []

    def on_event(self, fn: Callable[[MemoryEvent], None]) -> Callable[[MemoryEvent], None]:
        """Call `fn(event)` for every event from now on (usable as a decorator)."""
        self._callbacks.append(fn)
        return fn

    def check(self, used_bytes: int) -> list[MemoryEvent]:
        """Events for the thresholds `used_bytes` crossed upward since the last check; a threshold fires again
        only after usage went back below it."""
        events = []
        for i, threshold in enumerate(self.thresholds):
            above = used_bytes >= threshold * self.budget_bytes
            if above and self._armed[i]:
                kind = "critical" if i == len(self.thresholds) - 1 and len(self.thresholds) > 1 else "warning"
                fraction = used_bytes / self.budget_bytes
                events.append(MemoryEvent(
                    kind, used_bytes, self.budget_bytes, fraction,
                    f"{self.what} use {format_bytes(used_bytes)} is {fraction:.0%} of the "
                    f"{format_bytes(self.budget_bytes)} budget (crossed {threshold:.0%})", threshold))
            self._armed[i] = not above
        for event in events:
            self._emit(event)
        return events

    def admit(self, predicted_peak_bytes: int, used_bytes: int | None = None,
              ladder: Sequence[tuple[str, Relief]] = ()) -> list[str]:
        """Let a turn whose predicted peak is `predicted_peak_bytes` run, first climbing `ladder` (name, relief)
        rungs while it does not fit; return the names of the rungs used. Raise MemoryBudgetExceeded if it still
        does not fit (nothing of the turn has run, so the session stays usable)."""
        used = devices.rss_bytes() if used_bytes is None else used_bytes  # CUDA callers pass allocated bytes
        needed, applied = predicted_peak_bytes, []
        for name, relief in ladder:
            if needed <= self.budget_bytes:
                break
            freed = relief(needed - self.budget_bytes)
            if freed > 0:
                applied.append(name)
                needed -= freed
                used -= freed
        if needed <= self.budget_bytes:
            return applied
        available = max(0, self.budget_bytes - used)
        tried = f" after {' → '.join(applied)}" if applied else ""
        message = (f"this turn would peak at about {format_bytes(needed)}{tried}, over the {self.what} budget of "
                   f"{format_bytes(self.budget_bytes)} ({format_bytes(available)} of it free now); {SUGGESTION}")
        self._emit(MemoryEvent("refused", needed, self.budget_bytes, needed / self.budget_bytes, message))
        raise MemoryBudgetExceeded(message, needed=needed, available=available, budget=self.budget_bytes)

    def _emit(self, event: MemoryEvent) -> None:
        logger.log(logging.WARNING if event.kind == "warning" else logging.ERROR, event.message)
        if event.kind != "refused":  # a refusal is raised as an error; a warning on top would say it twice
            warnings.warn(event.message, MemoryWarning, stacklevel=4)
        for fn in self._callbacks:
            fn(event)


def predict_turn_peak(llm: Any, cache: Any, new_tokens: int, used_bytes: int | None = None,
                      chunk: int | None = None) -> int:
    """Predicted peak of the process (CPU: RSS; CUDA: allocated device bytes) while `cache` takes `new_tokens`
    more tokens through `llm` in prefill steps of `chunk` (default: the runner's): what is in use now plus the
    largest step's activations plus a scratch the pool has yet to allocate. The KV pool is allocated up front, but
    on CPU its pages are committed when first written (kvcache/pool.lazy_zeros), so the KV of the new tokens is
    counted as if every one of their pages were new (at most that much too high)."""
    device = llm.device.type
    used_bytes = devices.usage_bytes(llm.device) if used_bytes is None else used_bytes
    spec, pool = cache.spec, cache.pool
    keys = min(cache.num_tokens + new_tokens, cache.capacity)
    step = max(1, min(chunk or llm.runner.chunk, new_tokens, keys))
    transient = activation_peak(llm.config, spec, step, keys, device, cache.policy.needs_attention)
    pending_scratch = scratch_bytes(spec, pool.num_blocks) if spec.quantized and not pool.workspace_bytes else 0
    pending_kv = int(min(new_tokens, cache.capacity) * spec.bytes_per_token) if pool.committed_on_write else 0
    return used_bytes + transient + pending_scratch + pending_kv


def fitting_chunk(llm: Any, cache: Any, new_tokens: int, budget_bytes: int, used_bytes: int | None = None) -> int:
    """The largest prefill chunk (halving from the runner's) whose predicted turn peak fits `budget_bytes`; 0 if
    not even one token at a time fits. A first, lossless rung of the relief ladder: activations shrink with
    the chunk while the conversation stays whole."""
    used_bytes = devices.usage_bytes(llm.device) if used_bytes is None else used_bytes
    chunk = llm.runner.chunk
    while chunk >= 1:
        if predict_turn_peak(llm, cache, new_tokens, used_bytes, chunk) <= budget_bytes:
            return chunk
        chunk //= 2
    return 0


def admit_turn(guard: MemoryGuard, llm: Any, cache: Any, new_tokens: int, chunk: int | None = None,
               ladder: Sequence[tuple[str, Relief]] = (), used_bytes: int | None = None) -> tuple[int, int]:
    """Admit a turn that prefills `new_tokens` into `cache` under `guard`'s budget; return (the prefill chunk to
    use, the predicted peak). The chunk is `chunk` (default: the runner's) if the turn fits, else the largest
    smaller one that fits (lossless); else `ladder`'s rungs run; else MemoryBudgetExceeded, before any work."""
    used = devices.usage_bytes(llm.device) if used_bytes is None else used_bytes
    chunk = chunk or llm.runner.chunk
    predicted = predict_turn_peak(llm, cache, new_tokens, used, chunk)
    if predicted > guard.budget_bytes:
        smaller = fitting_chunk(llm, cache, new_tokens, guard.budget_bytes, used)
        if smaller:
            chunk = min(chunk, smaller)
            predicted = predict_turn_peak(llm, cache, new_tokens, used, chunk)
    guard.admit(predicted, used_bytes=used, ladder=ladder)
    return chunk, predicted


def admit_chat_turn(llm: Any, cache: Any, held: int, system: int, message: int, feed: int) -> int:
    """Refuse, before any work, a chat turn that cannot fit `cache` (with `held` tokens kept, a `system` prompt and
    a `message` to feed, `feed` tokens in all); the prefill chunk it runs with (smaller if the process budget
    needs it). Every turn needs one token of room beyond its message: the first token of the reply."""
    needed = held + system + message + 1
    if not cache.policy.evicts and needed > cache.capacity:
        raise ContextOverflowError(
            f"this turn needs {needed} tokens of context and the KV cache holds {cache.capacity} "
            f"({cache.num_tokens} already used by the conversation); start a new chat, send a shorter message, "
            "raise the KV budget or choose an evicting policy", needed=needed, available=cache.capacity)
    pinned = system or cache.segment_tokens(0)
    if cache.policy.evicts and pinned + message + 1 > cache.capacity:
        raise KVBudgetExceeded(
            f"this message is {message} tokens; with the pinned system prompt ({pinned} tokens) it does not fit "
            f"the KV budget of {cache.capacity} tokens even after evicting everything else; send a shorter message "
            "or raise --kv-budget", needed=pinned + message + 1, available=cache.capacity)
    chunk = prefill_chunk(llm.runner.chunk, cache.capacity, cache.policy.evicts)
    if llm.guard is not None:  # refuse if this turn's predicted peak cannot fit the process budget
        chunk, _ = admit_turn(llm.guard, llm, cache, feed, chunk)
    return chunk
