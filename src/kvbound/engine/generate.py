"""The decode loop: sample, stream text pieces (UTF-8 safe, stop strings held back), stop on stop tokens/strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kvbound.engine.batch import decode_step
from kvbound.engine.runner import Runner
from kvbound.engine.sampler import Sampler, SamplingParams
from kvbound.errors import ContextOverflowError
from kvbound.kvcache.base import KVCache
from kvbound.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Generation:
    """What one decode loop produced; filled in as `stream_tokens` runs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (stop token/string) | "length" (max_new_tokens) | "context_full"
    prefill_s: float = 0.0
    decode_s: float = 0.0


def stream_tokens(runner: Runner, tokenizer: Tokenizer, cache: KVCache, logits: torch.Tensor,
                  params: SamplingParams, history: list[int], result: Generation) -> Iterator[str]:
    """Continue from `logits` (the prefill's last), feeding each sampled token back; yields text pieces.

    Every sampled token is written to the cache, the final stop token included, so the cache holds exactly
    what the model said and the next turn continues after it without a re-prefill. Inside
    `engine.batch.decode_requests()` each decode step is also yielded, as a DecodeRequest, for batching.
    """
    sampler = Sampler(params, device=logits.device)
    decoder = StreamDecoder(tokenizer, skip_special=True)
    stop_ids = set(tokenizer.stop_ids) | set(params.stop_token_ids)
    holdback = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
    seen = list(history) if params.repetition_penalty != 1.0 else []
    text, emitted = "", 0
    started = time.perf_counter()
    for step in range(params.max_new_tokens):
        token = sampler(logits, seen)
        result.token_ids.append(token)
        seen.append(token)
        if token in stop_ids:
            result.finish_reason = "stop"
        else:
            text += decoder.push(token)
            cut = _find_stop(text, params.stop)
            if cut is not None:
                text, result.finish_reason = text[:cut], "stop"
            elif step == params.max_new_tokens - 1:
                text += decoder.flush()
                result.finish_reason = "length"
        try:
            logits = yield from decode_step(runner, token, cache)
        except ContextOverflowError:
            result.token_ids.pop()  # not in the cache, so not part of the conversation
            result.finish_reason = "context_full"
        safe = len(text) if result.finish_reason else max(emitted, len(text) - holdback)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if result.finish_reason:
            break
    result.text = text
    result.decode_s = time.perf_counter() - started


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
