"""The decode loop as an object the caller drives: a `Decoder` holds the token it sampled until someone feeds it
to the cache (alone, or in a batch with other sequences: engine/batch.py) and hands back the logits after it;
a `Turn` is a decoder plus what ends its work (commit, or roll back on failure or cancel). A generation with a
`json_schema` or `grammar` samples only the tokens it allows and stops when the text is whole; one with `logprobs`
records each token's logprobs and releases them with the text they make (`take_logprobs`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator

import torch

from kvbound.engine.constraint import Constraint, GrammarConstraint, JsonConstraint
from kvbound.engine.logprobs import TokenLogprob, token_logprob
from kvbound.engine.sampler import Sampler, SamplingParams
from kvbound.errors import ContextOverflowError
from kvbound.kvcache.base import KVCache
from kvbound.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from kvbound.engine.runner import Runner


@dataclass
class Generation:
    """What one decode loop produced; filled in as the decoder runs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # "stop" (stop token/string, a json_schema document complete) | "length" (max_new_tokens) | "context_full"
    finish_reason: str = ""
    # With SamplingParams.logprobs: one per token of `text` (stop tokens and tokens after a stop string left out)
    logprobs: list[TokenLogprob] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0


class Decoder:
    """Sample, detokenize (UTF-8 safe, stop strings held back), stop on stop tokens/strings.

    `token` is the sampled token waiting for its decode step (None once finished); `feed(logits)` takes the logits
    (V,) after it, or None when the cache had no room for it, and returns the text now safe to show. Every sampled
    token is fed, the final stop token included, so the cache holds exactly what the model said and the next turn
    continues after it without a re-prefill."""

    def __init__(self, runner: "Runner", tokenizer: Tokenizer, cache: KVCache, logits: torch.Tensor,
                 params: SamplingParams, history: list[int], result: Generation | None = None):
        self.runner, self.cache, self.params = runner, cache, params
        self.result = result if result is not None else Generation()
        self._sampler = Sampler(params, device=logits.device)
        self._constraint = _constraint(params, tokenizer)
        self._detok = StreamDecoder(tokenizer, skip_special=True)
        self._stop_ids = set(tokenizer.stop_ids) | set(params.stop_token_ids)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
        self._seen = list(history) if params.repetition_penalty != 1.0 else []
        self._text, self._emitted = "", 0
        if params.logprobs is not None:
            self.result.logprobs = []
        # A token's logprob waits for its text: (start, end) offsets in the text, end None while the token's text is
        # not out yet (part of a UTF-8 character). Released ones (their text fed out) wait to be taken.
        self._pending: list[tuple[int, int | None, TokenLogprob]] = []
        self._released: list[TokenLogprob] = []
        self._started = time.perf_counter()
        self.token: int | None = None
        self._sample(logits)

    @property
    def done(self) -> bool:
        return self.token is None

    def _sample(self, logits: torch.Tensor) -> None:
        result, params, constraint = self.result, self.params, self._constraint
        token = self._sampler(logits if constraint is None else constraint.mask(logits), self._seen)
        if constraint is not None:
            constraint.advance(token)
        result.token_ids.append(token)
        self._seen.append(token)
        if token in self._stop_ids:
            result.finish_reason = "stop"
        else:
            if params.logprobs is not None:  # the raw logits: the model's own distribution (engine/logprobs.py)
                self._pending.append((len(self._text), None, token_logprob(logits, token, params.logprobs)))
            self._add_text(self._detok.push(token))
            cut = _find_stop(self._text, params.stop)
            if cut is not None:
                self._text, result.finish_reason = self._text[:cut], "stop"
                self._pending = [p for p in self._pending if p[0] < cut]  # the stop string's tokens are not the reply's
            elif constraint is not None and constraint.complete:  # the text is whole: nothing may follow
                self._add_text(self._detok.flush())
                result.finish_reason = "stop"
            elif len(result.token_ids) == params.max_new_tokens:
                self._add_text(self._detok.flush())
                result.finish_reason = "length"
        self.token = token

    def _add_text(self, text: str) -> None:
        self._text += text
        if text and self._pending and self._pending[-1][1] is None:
            end = len(self._text)
            self._pending = [(start, end if stop is None else stop, entry) for start, stop, entry in self._pending]

    def _release(self, upto: int | None) -> None:
        """Logprobs of the tokens whose text ends by `upto` (None: all that are left) go out with that text."""
        if not self._pending:
            return
        out = len(self._pending) if upto is None else 0
        while out < len(self._pending) and self._pending[out][1] is not None and self._pending[out][1] <= upto:
            out += 1
        released = [entry for _, _, entry in self._pending[:out]]
        del self._pending[:out]
        self._released += released
        self.result.logprobs += released

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens whose text the calls to `feed` returned since the last call (none unless the
        generation asked for logprobs)."""
        taken, self._released = self._released, []
        return taken

    def feed(self, logits: torch.Tensor | None) -> str:
        result = self.result
        if logits is None:
            result.token_ids.pop()  # not in the cache, so not part of the conversation
            result.finish_reason = "context_full"
        text = self._text
        safe = len(text) if result.finish_reason else max(self._emitted, len(text) - self._holdback)
        if self._pending and not result.finish_reason:  # with logprobs, a piece ends where a token's text ends
            safe = max([self._emitted] + [end for _, end, _ in self._pending if end is not None and end <= safe])
        piece, self._emitted = text[self._emitted:safe], max(self._emitted, safe)
        self._release(None if result.finish_reason else self._emitted)
        if result.finish_reason:
            self.token = None
            result.text = text
            result.decode_s = time.perf_counter() - self._started
        else:
            self._sample(logits)
        return piece

    def step(self) -> str:
        """Feed `token` alone (no batch) and return the text it makes safe to show."""
        try:
            logits = self.runner.decode(self.token, self.cache)
        except ContextOverflowError:
            logits = None
        return self.feed(logits)


@dataclass
class Turn:
    """A generation past its prefill: `decoder` steps it; `commit()` once it is done returns its result;
    `abort()` undoes its work (a failure, or a client that went away)."""

    decoder: Decoder
    commit: Callable[[], Any]
    abort: Callable[[], None]

    def run(self) -> Generator[str, None, Any]:
        """Decode alone to the end, yielding text pieces, and return what `commit()` returns; aborts on any
        failure, or when closed early."""
        try:
            while not self.decoder.done:
                piece = self.decoder.step()
                if piece:
                    yield piece
        except BaseException:
            self.abort()
            raise
        return self.commit()


def stream_tokens(runner: "Runner", tokenizer: Tokenizer, cache: KVCache, logits: torch.Tensor,
                  params: SamplingParams, history: list[int], result: Generation) -> Iterator[str]:
    """Continue from `logits` (the prefill's last), feeding each sampled token back; yields text pieces."""
    decoder = Decoder(runner, tokenizer, cache, logits, params, history, result)
    while not decoder.done:
        piece = decoder.step()
        if piece:
            yield piece


def _constraint(params: SamplingParams, tokenizer: Tokenizer) -> Constraint | None:
    if params.json_schema is not None:
        return JsonConstraint(params.json_schema, tokenizer)
    if params.grammar is not None:
        return GrammarConstraint(params.grammar, tokenizer)
    return None


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
